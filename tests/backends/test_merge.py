"""Cross-user batching: several requests in one forward, each equal to running alone, each failing alone."""

import threading

import pytest
import torch

import interlace
from interlace import LanguageModel
from interlace.backends.limits import Limits
from interlace.backends.merge import merge, merge_key
from interlace.backends.serialize import deserialize_request, serialize_graph
from interlace.backends.state import ModelState

from helpers import assert_clean, tiny, tiny_tokenizer


@pytest.fixture(scope="module")
def lm():
    return LanguageModel(tiny("llama"), tokenizer=tiny_tokenizer())


def request_of(tracer):
    """The request a client would send for this trace, as the server reads it."""
    return deserialize_request(serialize_graph(tracer.graph, tracer.invokes, options=tracer.spec(0).options))


def recorded(lm, record, **options):
    """Record a trace without running it: its request and the indices of its saved nodes."""
    tracer = lm.trace(**options)
    tracer.__enter__()
    try:
        record(lm, tracer)
    finally:
        interlace.tracer._active.remove(tracer)
        lm._detach(tracer)
        tracer._closed = True
    return request_of(tracer)


def steer(prompt, layer, scale):
    def record(lm, tracer):
        with tracer.invoke(prompt):
            lm.model.layers[layer].output[:, -1] *= scale
            lm.output.logits.save()
            lm.model.layers[0].output.save()
    return record


def two_invokes(lm, tracer):
    with tracer.invoke("w5 w6"):
        hidden = lm.model.layers[0].output
    with tracer.invoke("w7 w8 w9 w10"):
        lm.model.layers[0].output[:, -1] = hidden[:, -1]
    lm.output.logits.save()  # outside the invokes: this request's whole batch, and only it


def assert_same(answer, alone):
    assert isinstance(answer, interlace.graph.Outcome), answer
    assert sorted(answer.results) == sorted(alone.results)
    for index, value in alone.results.items():
        torch.testing.assert_close(answer.results[index], value, rtol=1e-5, atol=1e-6)


def test_merged_requests_each_equal_running_alone(lm):
    requests = [recorded(lm, steer("w5 w6 w7 w8", 1, 2.0)), recorded(lm, two_invokes),
                recorded(lm, steer("w9 w10 w11 w12", 0, -1.0)), recorded(lm, steer("w3 w4", 1, 0.5))]
    assert len({merge_key(r) for r in requests}) == 1
    merged, parts = merge(requests[:3])
    assert len(merged.traces[0].invokes) == 4 and [p.invokes for p in parts] == [1, 2, 1]
    runs = []
    original = lm._execute
    lm._execute = lambda graph, trace, **run: runs.append(len(trace.invokes)) or original(graph, trace, **run)
    try:
        answers = lm.run_many(requests)
    finally:
        del lm._execute
    assert sorted(runs) == [1, 4]  # the three of 4 tokens in one forward; the one of 2 tokens alone
    for request, answer in zip(requests, answers):
        assert_same(answer, lm.run(request))
    assert answers[1].results[max(answers[1].results)].shape == (2, 4, 100)  # its own two rows only
    assert_clean(lm.module)


def test_a_failing_request_fails_alone(lm):
    def broken(lm, tracer):
        with tracer.invoke("w5 w6"):
            lm.model.layers[0].output[:, 0, 999].save()  # index out of range

    good = [recorded(lm, steer("w5 w6", 1, 2.0)), recorded(lm, steer("w8 w9", 1, 3.0))]
    answers = lm.run_many([good[0], recorded(lm, broken), good[1]])
    assert isinstance(answers[1], interlace.ExecutionError) and answers[1].node["index"] == 1
    assert "IndexError" in str(answers[1])
    assert_same(answers[0], lm.run(good[0]))
    assert_same(answers[2], lm.run(good[1]))


def test_one_request_stopping_does_not_cut_the_forward_for_the_others(lm):
    def stops_early(lm, tracer):
        with tracer.invoke("w5 w6"):
            lm.model.layers[0].output.save()
            tracer.stop()
            lm.output.logits.save()

    full = recorded(lm, steer("w5 w7", 1, 2.0))
    answers = lm.run_many([recorded(lm, stops_early), full])
    assert list(answers[0].results) == [0] and "stopped" in next(iter(answers[0].missing.values()))
    assert_same(answers[1], lm.run(full))


def test_a_cancelled_request_leaves_the_batch_cleanly(lm):
    requests = [recorded(lm, steer("w5 w6", 1, 2.0)), recorded(lm, steer("w8 w9", 0, 2.0))]
    cancelled = threading.Event()
    cancelled.set()
    answers = lm.run_many(requests, cancels=[cancelled, None])
    assert isinstance(answers[0], interlace.CancelledError)
    assert_same(answers[1], lm.run(requests[1]))


def test_a_request_that_breaks_the_forward_is_found_by_running_alone(lm):
    def wrong_shape(lm, tracer):
        with tracer.invoke("w5 w6"):
            lm.model.layers[0].output = torch.zeros(1, 2, 7)  # the next layer cannot take it
            lm.output.logits.save()

    good = recorded(lm, steer("w5 w7", 1, 2.0))
    answers = lm.run_many([recorded(lm, wrong_shape), good])
    assert isinstance(answers[0], interlace.InterlaceError)
    assert_same(answers[1], lm.run(good))


def test_generations_with_the_same_settings_share_one_generate(lm):
    def generation(prompt, scale):
        def record(lm, tracer):
            with tracer.invoke(prompt):
                with tracer.all():
                    lm.model.layers[0].output[:, -1] *= scale
                lm.generator.output.save()
        return record

    tracers = []
    for prompt, scale in (("w5 w6", 2.0), ("w7 w8", 0.5), ("w10 w11", 1.5)):
        tracer = lm.generate(max_new_tokens=4)
        tracer.__enter__()
        try:
            generation(prompt, scale)(lm, tracer)
        finally:
            interlace.tracer._active.remove(tracer)
            lm._detach(tracer)
            tracer._closed = True
        tracers.append(request_of(tracer))
    answers = lm.run_many(tracers)
    for request, answer in zip(tracers, answers):
        alone = lm.run(request)
        tokens, want = answer.results[max(answer.results)], alone.results[max(alone.results)]
        assert torch.equal(tokens[:, -4:], want[:, -4:])  # the same token choices


def test_untrusted_merged_runs_keep_the_weights_and_refuse_writes_alone(lm):
    def writes_a_weight(lm, tracer):
        with tracer.invoke("w5 w6"):
            lm.model.norm.weight[:] = 0
            lm.output.logits.save()

    good = recorded(lm, steer("w5 w7", 1, 2.0))
    state = ModelState(lm.module)
    answers = lm.run_many([recorded(lm, writes_a_weight), good], untrusted=True, limits=Limits())
    assert isinstance(answers[0], interlace.RefusedError)
    assert_same(answers[1], lm.run(good))
    assert state.diff() == []
