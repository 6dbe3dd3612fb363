"""Cross-user batching: several requests in one forward, each equal to running alone, each failing alone."""

import threading

import pytest
import torch
import transformers

import interlace
from interlace import LanguageModel
from interlace.backends.limits import Limits
from interlace.backends.merge import merge, merge_key
from interlace.backends.serialize import deserialize_request, serialize_graph
from interlace.backends.state import ModelState

from helpers import assert_clean, tiny, tiny_tokenizer
from hostile import Builder


@pytest.fixture(scope="module")
def lm():
    return LanguageModel(tiny("llama"), tokenizer=tiny_tokenizer())


def request_of(tracer):
    """The request a client would send for this trace, as the server reads it."""
    return deserialize_request(serialize_graph(tracer.graph, tracer.invokes, options=tracer.spec(0).options))


def recorded(lm, record, *, method: str = "trace", **options):
    """Record a trace (or a generation) without running it: its request."""
    tracer = getattr(lm, method)(**options)
    tracer.__enter__()
    try:
        record(lm, tracer)
    finally:
        interlace.tracer.active().remove(tracer)
        lm._detach(tracer)
        tracer._closed = True
        tracer._resume_collector()
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


def run_counting(lm, requests):
    """`lm.run_many(requests)`, and the invokes of each forward it ran."""
    runs = []
    original = lm._execute
    lm._execute = lambda graph, trace, **run: runs.append(len(trace.invokes)) or original(graph, trace, **run)
    try:
        return lm.run_many(requests), runs
    finally:
        del lm._execute


def test_merged_requests_each_equal_running_alone(lm):
    requests = [recorded(lm, steer("w5 w6 w7 w8", 1, 2.0)), recorded(lm, two_invokes),
                recorded(lm, steer("w9 w10 w11 w12", 0, -1.0)), recorded(lm, steer("w3 w4", 1, 0.5))]
    assert len({merge_key(r) for r in requests}) == 1
    merged, parts = merge(requests[:3])
    assert len(merged.traces[0].invokes) == 4 and [p.invokes for p in parts] == [1, 2, 1]
    answers, runs = run_counting(lm, requests)
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


def test_a_request_with_a_prompt_without_tokens_fails_alone_and_the_others_share_a_forward(lm):
    def empty(lm, tracer):
        with tracer.invoke(["w5 w6", ""]):
            lm.output.logits.save()

    good = [recorded(lm, steer("w5 w6", 1, 2.0)), recorded(lm, steer("w8 w9", 1, 3.0))]
    answers, runs = run_counting(lm, [good[0], recorded(lm, empty), good[1]])
    assert isinstance(answers[1], interlace.InterlaceError) and "prompt 1 of invoke 0 has no tokens" in str(answers[1])
    assert sorted(runs) == [1, 2]  # the empty one tried alone (its one invoke); the two good ones in one forward
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

    tracers = [recorded(lm, generation(prompt, scale), method="generate", max_new_tokens=4)
               for prompt, scale in (("w5 w6", 2.0), ("w7 w8", 0.5), ("w10 w11", 1.5))]
    answers = lm.run_many(tracers)
    for request, answer in zip(tracers, answers):
        alone = lm.run(request)
        tokens, want = answer.results[max(answer.results)], alone.results[max(alone.results)]
        assert torch.equal(tokens[:, -4:], want[:, -4:])  # the same token choices


def test_a_job_whose_rows_end_ends_there_while_the_batch_goes_on(lm):
    def generation(prompts):
        def record(lm, tracer):
            with tracer.invoke(prompts):
                steps = interlace.list().save()
                with tracer.all():
                    steps.append(lm.model.layers[0].output[:, -1])
                lm.generator.output.save()
        return record

    # with the end tokens 80 and 94: "w5 w6" makes 36, 80 and "w1 w2" 41, 94, so both end at step 1; "w7 w8"
    # never ends; of ["w3 w9", "w5 w6"] one row ends at step 1 and the other never (it is padded after its end)
    prompts = ["w5 w6", "w7 w8", "w1 w2", ["w3 w9", "w5 w6"]]
    requests = [recorded(lm, generation(p), method="generate", max_new_tokens=5, eos_token_id=[80, 94]) for p in prompts]
    streamed = [[] for _ in requests]
    answered = [[] for _ in requests]  # (its answer, the steps "w7 w8" had made then), as each comes
    runs = []
    original = lm._execute
    lm._execute = lambda graph, trace, **run: runs.append(len(trace.invokes)) or original(graph, trace, **run)
    try:
        answers = lm.run_many(requests, on_steps=[steps.append for steps in streamed],
                              on_answers=[lambda answer, into=into: into.append((answer, len(streamed[1])))
                                          for into in answered])
    finally:
        del lm._execute
    assert runs == [4]  # one generate for all
    # a job that ends before the others is answered at its last step, not once the batch has ended (the same
    # answer, once); those that end with the batch are answered by what run_many returns
    assert [[made for _, made in got] for got in answered] == [[2], [], [2], []]
    assert answered[0][0][0] is answers[0] and answered[2][0][0] is answers[2]
    lengths = []
    for request, answer, steps in zip(requests, answers, streamed):
        alone_steps = []
        alone = lm.run(request, on_step=alone_steps.append)
        assert sorted(answer.results) == sorted(alone.results) and answer.missing == alone.missing
        for index, value in alone.results.items():
            if type(value) is list:
                assert len(answer.results[index]) == len(value)
                torch.testing.assert_close(answer.results[index], value, rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(answer.results[index], value)  # the tokens, cut to the job's own steps
        assert [step.index for step in steps] == [step.index for step in alone_steps]
        assert all(torch.equal(ours.tokens, theirs.tokens) for ours, theirs in zip(steps, alone_steps))
        lengths.append(len(alone_steps))
    assert lengths == [2, 5, 2, 5]


def test_a_generation_returning_a_dict_is_not_answered_before_the_batch_ends_and_equals_alone(lm):
    def generation(prompt):
        def record(lm, tracer):
            with tracer.invoke(prompt):
                lm.generator.output.sequences.save()
        return record

    # "w5 w6" ends at step 1 (see above), "w7 w8" never: generate's dict (scores too) cannot be made from the
    # tokens of the steps, so the ended job waits for the batch's end (and then runs again alone)
    requests = [recorded(lm, generation(prompt), method="generate", max_new_tokens=5, eos_token_id=[80, 94],
                         return_dict_in_generate=True) for prompt in ("w5 w6", "w7 w8")]
    answered = []
    answers = lm.run_many(requests, on_answers=[answered.append, answered.append])
    assert answered == []
    for request, answer in zip(requests, answers):
        alone = lm.run(request)
        assert torch.equal(answer.results[1], alone.results[1])
    assert [answer.results[1].shape[1] for answer in answers] == [2 + 2, 2 + 5]


def test_generations_with_several_rows_per_prompt_or_rows_ended_by_a_string_run_alone(lm):
    def generation(lm, tracer):
        with tracer.invoke("w5 w6"):
            lm.generator.output.save()

    wide = [recorded(lm, generation, method="generate", max_new_tokens=3, num_beams=2) for _ in range(2)]
    assert merge_key(wide[0]) is None
    for ends in ({"stop_strings": ["w9"]}, {"max_time": 10.0}):  # rows that end where a merged run cannot tell
        assert merge_key(recorded(lm, generation, method="generate", max_new_tokens=3, **ends)) is None
    answers, runs = run_counting(lm, wide)
    want = lm.run(wide[0]).results
    assert runs == [1, 1] and all(torch.equal(answer.results[max(want)], want[max(want)]) for answer in answers)


def test_seeded_samples_run_alone_and_draw_what_they_draw_alone(lm):
    def generation(lm, tracer):
        with tracer.invoke("w5 w6"):
            lm.generator.output.save()

    sampled = [recorded(lm, generation, method="generate", max_new_tokens=6, do_sample=True, seed=3) for _ in range(3)]
    greedy = recorded(lm, generation, method="generate", max_new_tokens=6, seed=3)  # no draws: shares
    assert {merge_key(request) for request in sampled} == {None} and merge_key(greedy) is not None
    answers, runs = run_counting(lm, sampled)
    assert runs == [1, 1, 1]
    alone = lm.run(sampled[0])
    want = alone.results[max(alone.results)]
    for answer in answers:
        assert torch.equal(answer.results[max(answer.results)], want)


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


# -- a job that attacks the others in its batch: it sees and changes only its own rows ------------------
def counting_runs(lm):
    """Wrap lm._execute so each forward's invoke count is recorded; returns the list."""
    runs, original = [], lm._execute
    lm._execute = lambda graph, trace, **run: runs.append(len(trace.invokes)) or original(graph, trace, **run)
    return runs


def run_together(lm, requests):
    """Untrusted requests run as one merged batch: (their answers, the invokes of each forward run)."""
    runs = counting_runs(lm)
    try:
        return lm.run_many(requests, untrusted=True, limits=Limits()), runs
    finally:
        del lm._execute


def layer_inputs(g, path, call=0):
    return g.add("module_value", path, kwargs={"kind": "inputs", "call": call, "invoke": None})


def test_the_generation_cache_in_a_layers_inputs_is_not_another_jobs(lm):
    def generation(lm, tracer):
        with tracer.invoke("w7 w8 w9"):
            lm.generator.output.save()

    victim = recorded(lm, generation, method="generate", max_new_tokens=4)
    g = Builder()
    cache = g.call("operator.getitem", g.call("operator.getitem", layer_inputs(g, "model.layers.0", call=1), 1), "cache")
    keys = g.call("operator.getitem", g.call("operator.getitem", g.call("builtins.list", cache), 0), 0)
    g.method("add_", keys, 100.0)  # every row's keys of layer 0, were the cache handed out whole
    g.save(g.out("generator"))
    attacker = deserialize_request(g.bytes(mode="generate", kwargs={"max_new_tokens": 4}))
    assert lm.batching(attacker)[0] == lm.batching(victim)[0]  # they share a forward
    state = ModelState(lm.module)
    answers, runs = run_together(lm, [attacker, victim])
    assert runs == [2, 1]  # together, then the attacker alone: the cache is its own only there
    alone = lm.run(victim, untrusted=True)
    assert torch.equal(answers[1].results[0], alone.results[0])
    assert answers[0].results[g.graph.saved()[0]].shape[0] == 1
    assert state.diff() == []


def test_the_cache_in_the_model_output_is_not_readable_in_a_shared_batch(lm):
    victim = recorded(lm, steer("w9 w10 w11", 1, 2.0))
    g = Builder()
    cache = g.call("operator.getitem", g.out(""), "cache")
    keys = g.save(g.call("operator.getitem", g.call("operator.getitem", g.call("builtins.list", cache), 0), 0))
    attacker = deserialize_request(g.bytes())
    answers, runs = run_together(lm, [attacker, victim])
    assert runs == [2, 1]
    assert answers[0].results[keys.index].shape[0] == 1  # only its own prompt's keys
    assert_same(answers[1], lm.run(victim))


def test_a_swap_of_a_layers_inputs_changes_only_the_jobs_own_rows(lm):
    victim = recorded(lm, steer("w9 w10 w11", 0, 1.0))
    g = Builder()
    inputs = layer_inputs(g, "model.layers.1")
    args, kwargs = g.call("operator.getitem", inputs, 0), g.call("operator.getitem", inputs, 1)
    zeros = g.call("torch.zeros_like", g.call("operator.getitem", args, 0))
    g.add("swap", None, (inputs, g.call("builtins.tuple", [g.call("builtins.tuple", [zeros]), kwargs])))
    logits = g.save(g.call("operator.getitem", g.out(""), "logits"))
    attacker = deserialize_request(g.bytes())
    answers, runs = run_together(lm, [attacker, victim])
    assert runs == [2]  # nothing it needed was shared: one forward
    assert_same(answers[1], lm.run(victim))
    alone = lm.run(attacker, untrusted=True)
    torch.testing.assert_close(answers[0].results[logits.index], alone.results[logits.index], rtol=1e-5, atol=1e-6)


def test_a_value_every_job_shares_can_be_read_when_plain_but_never_replaced(lm):
    victim = recorded(lm, steer("w9 w10 w11", 0, 1.0))
    g = Builder()
    inputs = layer_inputs(g, "model.layers.0")
    kwargs = g.call("builtins.dict", g.call("operator.getitem", inputs, 1))
    use_cache = g.save(g.call("operator.getitem", kwargs, "use_cache"))  # a plain value: readable
    reader = deserialize_request(g.bytes())
    g.call("operator.setitem", kwargs, "use_cache", False)  # but it is every job's: not changed for them
    g.add("swap", None, (inputs, g.call("builtins.tuple", [g.call("operator.getitem", inputs, 0), kwargs])))
    writer = deserialize_request(g.bytes())
    runs = counting_runs(lm)
    try:
        answers = lm.run_many([reader, victim], untrusted=True, limits=Limits())
        assert runs == [2] and answers[0].results[use_cache.index] is True
        answers = lm.run_many([writer, victim], untrusted=True, limits=Limits())
        assert runs == [2, 2, 1] and isinstance(answers[0], interlace.graph.Outcome)
    finally:
        del lm._execute
    assert_same(answers[1], lm.run(victim))


def test_a_module_call_with_hooks_runs_alone(lm):
    victim = recorded(lm, steer("w9 w10 w11", 1, 3.0))
    g = Builder()
    hidden = g.out("model.layers.0")
    g.save(g.add("module_call", "model.layers.1", (hidden,), {"hook": True}))
    attacker = deserialize_request(g.bytes())
    answers, runs = run_together(lm, [attacker, victim])
    assert runs == [2, 1]
    assert_same(answers[1], lm.run(victim))


class _Positions(torch.nn.Module):
    def forward(self, x):  # one position table for every row, expanded, as position ids often are
        return torch.arange(x.shape[1], dtype=x.dtype).expand(x.shape[0], -1)


class _WithPositions(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.positions, self.head = _Positions(), torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.head(x + self.positions(x)[..., None])


def attacked(net, victim_input, attacker_input, written: str):
    """A victim that saves the output and an attacker that first writes 100 into the output of module `written`,
    run as one shared batch (attacker first): ((their requests), their answers, the invokes of each forward)."""
    def victim(net, tracer):
        with tracer.invoke(victim_input):
            net.output.save()

    def attacker(net, tracer):
        with tracer.invoke(attacker_input):
            getattr(net, written).output[:] = 100.0
            net.output.save()

    requests = [recorded(net, attacker), recorded(net, victim)]
    answers, runs = run_together(net, requests)
    return requests, answers, runs


def test_a_value_whose_rows_share_memory_is_not_a_jobs_to_write():
    """A batch dimension made by `expand` is one row's memory for every row: writing "its rows" wrote every job's
    (the victim's output was off by 99.6)."""
    torch.manual_seed(0)
    net = interlace.Model(_WithPositions().eval())
    (attacker, victim), answers, runs = attacked(net, torch.randn(1, 3, 4), torch.randn(1, 3, 4), "positions")
    assert_same(answers[1], net.run(victim, untrusted=True))
    assert runs == [2, 1]  # together, then the attacker alone: the positions are its own only there
    assert_same(answers[0], net.run(attacker, untrusted=True))


class _SequenceFirst(torch.nn.Module):
    def forward(self, x):  # (batch, positions, features) -> (positions, batch, features), as a sequence-first layer
        return x.transpose(0, 1).contiguous()


class _WithSequenceFirst(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.sequence_first, self.head = _SequenceFirst(), torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.head(self.sequence_first(x).transpose(0, 1))


def test_a_first_dimension_that_only_has_the_batchs_size_is_not_a_jobs_rows():
    """Three rows of three positions: "its rows" of a sequence-first value were every job's first positions (the
    victim's output moved by 100); the forward itself shows the positions are no rows."""
    torch.manual_seed(0)
    net = interlace.Model(_WithSequenceFirst().eval())
    victim_input = torch.randn(1, 3, 4)
    (attacker, _), answers, runs = attacked(net, victim_input, torch.randn(2, 3, 4), "sequence_first")
    with torch.no_grad():
        torch.testing.assert_close(answers[1].results[0], net.module(victim_input))
    assert runs == [2, 1]  # together, then the attacker alone: the sequence-first value is its own only there
    assert_same(answers[0], net.run(attacker, untrusted=True))


def test_an_expert_first_value_of_a_mixture_of_experts_is_not_a_jobs_rows():
    """Mixtral's eager experts sum their routing mask per expert: 5 values (4 experts and 'none'). With 5 rows in
    the batch, the attacker's 4 rows were experts 0-3 of every token, which it turned off for the victim too."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0)
    config._experts_implementation = "eager"  # (the loop over experts, with its `.source` points)
    mixtral = LanguageModel(transformers.MixtralForCausalLM(config).eval(), tokenizer=tiny_tokenizer())

    def victim(lm, tracer):
        with tracer.invoke("w5 w6 w7"):
            lm.output.logits.save()

    def attacker(lm, tracer):
        with tracer.invoke(["w9 w10 w11"] * 4):
            lm.model.layers[0].mlp.experts.source.sum_0.output[:] = 0
            lm.output.logits.save()

    victim, attacker = recorded(mixtral, victim), recorded(mixtral, attacker)
    answers, runs = run_together(mixtral, [attacker, victim])
    with torch.no_grad():
        want = mixtral.module(**mixtral.tokenizer(["w5 w6 w7"], return_tensors="pt")).logits
    torch.testing.assert_close(answers[1].results[max(answers[1].results)], want)
    assert runs == [2, 1]  # together, then the attacker alone (the victim needed nothing the fake run could not see)
    assert_same(answers[0], mixtral.run(attacker, untrusted=True))


class _Caching(torch.nn.Module):
    def forward(self, x):  # keeps what it saw, as a rotary embedding keeps its cache length
        self.longest = x.shape[1]
        return x


class _WithCaching(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.caching, self.head = _Caching(), torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.head(self.caching(x))


def test_finding_which_values_hold_rows_leaves_the_model_as_it_was():
    net = interlace.Model(_WithCaching().eval())
    jobs = []
    for rows in (1, 2):
        def job(net, tracer, inputs=torch.randn(rows, 3, 4)):
            with tracer.invoke(inputs):
                net.caching.output.save()
        jobs.append(recorded(net, job))
    state = ModelState(net.module)
    answers, runs = run_together(net, jobs)
    assert runs == [2] and all(isinstance(answer, interlace.graph.Outcome) for answer in answers)
    assert state.diff() == [] and "longest" not in vars(net.module.caching)


def test_a_layout_found_once_serves_batches_of_other_sizes_and_still_refuses_the_coincidence(monkeypatch):
    """The layout is the model's way of laying out its values, not its sizes: a first shared batch (2 rows of 5
    positions) finds it, and the attack at other sizes (3 rows of 3 positions) meets it without a new fake run."""
    from interlace.backends import layout

    real, found = layout.find_layout, []
    monkeypatch.setattr(layout, "find_layout", lambda *args: found.append(args[3]) or real(*args))  # its batch size
    torch.manual_seed(0)
    net = interlace.Model(_WithSequenceFirst().eval())
    attacked(net, torch.randn(1, 5, 4), torch.randn(1, 5, 4), "head")  # (writing the head's output: no rows lost)
    victim_input = torch.randn(1, 3, 4)
    _, answers, runs = attacked(net, victim_input, torch.randn(2, 3, 4), "sequence_first")
    assert found == [2]  # one fake pair, for the first batch (2 rows); the attack's batch (3 rows) found it kept
    with torch.no_grad():
        torch.testing.assert_close(answers[1].results[0], net.module(victim_input))
    assert runs == [2, 1]



def test_options_that_differ_where_their_repr_elides_do_not_share_a_forward(lm):
    """Two `logits_to_keep` index tensors of 1500 positions that differ at one: torch's repr elides the middle, so
    the keys were equal, the jobs shared a forward, and the second got the first's logits there."""
    keep = [torch.zeros(1500, dtype=torch.long) for _ in range(2)]
    keep[0][700] = 1

    def logits(lm, tracer):
        with tracer.invoke("w5 w6"):
            lm.output.logits.save()

    requests = [recorded(lm, logits, logits_to_keep=k) for k in keep]
    assert repr(keep[0]) == repr(keep[1]) and {merge_key(request) for request in requests} == {None}
    answers, runs = run_together(lm, requests)
    assert runs == [1, 1]
    for request, answer in zip(requests, answers):
        assert_same(answer, lm.run(request, untrusted=True))
    assert not torch.equal(answers[0].results[max(answers[0].results)], answers[1].results[max(answers[1].results)])


class _WithContext(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.head, self.proj = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x, context):  # x: rows; context: vectors every row reads (no rows)
        return self.head(x) + self.proj(context).mean(0)


def test_a_second_input_tensor_is_not_laid_end_to_end_with_another_jobs():
    """A job's context (3 vectors every row reads) was concatenated with the attacker's: the victim's output was
    the mean over both contexts (-9.91 where alone it is -0.33)."""
    torch.manual_seed(0)
    net = interlace.Model(_WithContext().eval())
    victim_inputs = (torch.randn(1, 4), torch.randn(3, 4))
    attacker_inputs = (torch.randn(1, 4), torch.randn(3, 4) * 100)

    def job(inputs):
        def record(net, tracer):
            with tracer.invoke(*inputs):
                net.output.save()
        return record

    answers, runs = run_together(net, [recorded(net, job(attacker_inputs)), recorded(net, job(victim_inputs))])
    with torch.no_grad():
        torch.testing.assert_close(answers[1].results[0], net.module(*victim_inputs))
    assert runs == [1, 1]  # each alone: which of its tensors are rows is unknown


class _Tagged(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(4, 4)

    def forward(self, x, tag):
        return self.head(x) * len(tag)


def test_plain_inputs_that_differ_past_a_long_repr_do_not_share_a_forward():
    """The group held the first 100 characters of a plain input's repr: two tags equal there shared a forward, which
    could not batch them, and both jobs failed ('the invokes pass different non-tensor values')."""
    net = interlace.Model(_Tagged().eval())

    def job(tag):
        def record(net, tracer):
            with tracer.invoke(torch.randn(1, 4), tag):
                net.output.save()
        return record

    requests = [recorded(net, job("a" * 120 + "b")), recorded(net, job("a" * 120))]
    answers, runs = run_together(net, requests)
    assert runs == [1, 1]
    for request, answer in zip(requests, answers):
        assert_same(answer, net.run(request, untrusted=True))
