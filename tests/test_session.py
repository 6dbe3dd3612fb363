"""Sessions: control flow between traces (iter, cond, apply, stop), compared with separate traces."""

import pytest
import torch

import interlace
from interlace import LanguageModel, Model

from helpers import MLP, assert_clean, tiny, tiny_tokenizer


def _alone(mlp, x, layer_scale=None):
    """The head output of `mlp` on `x`, with layers[1]'s output scaled by a hand-written hook."""
    handle = None
    if layer_scale is not None:
        handle = mlp.layers[1].register_forward_hook(lambda m, a, out: out * layer_scale)
    try:
        with torch.no_grad():
            return mlp(x)
    finally:
        if handle is not None:
            handle.remove()


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Model(MLP().eval())


def test_iter_runs_the_block_and_its_trace_for_each_value(net, x):
    scales = [0.5, 1.0, 2.0, -1.0]
    with net.session() as session:
        outputs = interlace.list().save()
        with session.iter(scales) as scale:
            with net.trace(x):
                net.layers[1].output = net.layers[1].output * scale
                outputs.append(net.output)
                last = net.output.save()
    assert len(outputs) == len(scales)
    for scale, out in zip(scales, outputs):
        assert torch.equal(out, _alone(net.module, x, scale))
    assert torch.equal(last, outputs[-1])  # names bound in the loop hold the last value's
    assert_clean(net.module)


def test_iter_values_can_be_the_traces_inputs(net):
    torch.manual_seed(1)
    batches = [torch.randn(2, 3) for _ in range(3)]
    with net.session() as session:
        heads = interlace.list().save()
        with session.iter(batches) as batch:
            with net.trace(batch):
                heads.append(net.output)
    for batch, head in zip(batches, heads):
        assert torch.equal(head, _alone(net.module, batch))


def test_iter_over_prompts_on_a_language_model():
    model = tiny("gpt2")
    lm = LanguageModel(model, tokenizer=tiny_tokenizer())
    prompts = ["w5 w6 w7", "w8 w9", "w10 w11 w12 w13"]
    with lm.session() as session:
        last_logits = interlace.list().save()
        with session.iter(prompts) as prompt:
            with lm.trace(prompt):
                last_logits.append(lm.output.logits[0, -1])
    for prompt, logits in zip(prompts, last_logits):
        with lm.trace(prompt):
            want = lm.output.logits[0, -1].save()
        assert torch.equal(logits, want)


def test_cond_skips_the_interventions_of_a_trace(net, x):
    with net.session() as session:
        first = net.layers[0]
        with net.trace(x):
            total = first.output.sum().save()
        with session.cond(total > 1e9):  # false: the second trace runs unchanged
            with net.trace(x):
                net.layers[1].output = net.layers[1].output * 0
                skipped = net.output.save()
        with session.cond(total < 1e9):
            with net.trace(x):
                net.layers[1].output = net.layers[1].output * 0
                zeroed = net.output.save()
    assert isinstance(skipped, interlace.Proxy)
    with pytest.raises(ValueError, match="saved but has no value: its condition .* was false"):
        skipped.value
    assert torch.equal(zeroed, _alone(net.module, x, 0.0))


def test_apply_and_values_at_session_level(net, x):
    with net.session() as session:
        with net.trace(x):
            hidden = net.layers[0].output
        norm = session.apply(torch.linalg.norm, hidden).save()
        doubled = (hidden * 2).save()  # computed between the traces, from the first trace's value
        with net.trace(x):
            net.layers[0].output = doubled
            out = net.output.save()
    reference = net.module.layers[0](net.module.embed(x)).detach()
    assert torch.allclose(norm, torch.linalg.norm(reference))
    assert torch.equal(doubled, reference * 2)
    handle = net.module.layers[0].register_forward_hook(lambda m, a, o: o * 2)
    try:
        assert torch.equal(out, net.module(x).detach())
    finally:
        handle.remove()


def test_stop_ends_the_loop(net, x):
    with net.session() as session:
        seen = interlace.list().save()
        with session.iter([1, 2, 3, 4, 5]) as value:
            seen.append(value)
            with session.cond(value == 3):
                session.stop()
            with net.trace(x):
                net.output.save()
        after = session.apply(len, seen).save()  # the session goes on after the loop
    assert seen == [1, 2, 3] and after == 3


def test_iter_needs_concrete_values_and_no_open_trace(net, x):
    with pytest.raises(interlace.InterlaceError, match="outside `with model.trace"):
        with net.session() as session:
            with net.trace(x):
                with session.iter([1, 2]):
                    pass
    with pytest.raises(interlace.InterlaceError, match="was given no values"):
        with net.session() as session:
            with session.iter([]):
                pass


def test_session_scan_checks_every_trace_before_running(net, x):
    with pytest.raises(interlace.ExecutionError, match="found while scanning") as info:
        with net.session(scan=True):
            with net.trace(x):
                shape = net.layers[0].output.shape
                net.layers[0].output @ torch.ones(3, 3)  # (2, 8) @ (3, 3): wrong
    assert shape == (2, 8) and "test_session.py" in str(info.value)


def test_stop_in_a_loop_ends_only_that_loop(net):
    # nnsight 0.4's test_sequential_graph_based_context_exit, session.apply(list) as it writes it
    with net.session() as session:
        seen = session.apply(list).save()
        seen.append(0)
        with session.iter([1, 2, 3, 4]) as item:
            with session.cond(item == 3):
                session.stop()
            seen.append(item)
        seen.append(5)
        session.stop()
        seen.append(6)
    assert seen == [0, 1, 2, 5]


def test_a_value_after_a_stop_says_whether_the_stop_ended_its_loop_or_the_session(net):
    x = torch.randn(2, 3)
    with net.session() as session:
        with session.iter([1, 2]):
            session.stop()
            with net.trace(x):
                in_loop = net.output.save()
        session.stop()
        with net.trace(x):
            after = net.output.save()
    with pytest.raises(interlace.NotSavedError, match="session.stop\\(\\) ended its loop before it ran"):
        in_loop.shape
    with pytest.raises(interlace.NotSavedError, match="session.stop\\(\\) ended the session before it ran"):
        after.shape


def test_stop_without_condition_skips_the_rest_of_the_loop_only(net):
    with net.session() as session:
        seen = interlace.list().save()
        seen.append(0)
        with session.iter([1, 2, 3]) as item:
            session.stop()
            seen.append(item)
        seen.append(5)
    assert seen == [0, 5]


def test_stop_in_an_inner_loop_ends_the_inner_loop_of_each_outer_value(net, x):
    with net.session() as session:
        seen = interlace.list().save()
        with session.iter([10, 20]) as outer:
            with session.iter([1, 2, 3]) as inner:
                seen.append(outer + inner)
                with session.cond(inner == 2):
                    session.stop()
            with net.trace(x):
                seen.append(net.head.output.sum() * 0 + outer)  # a trace between the loops runs too
    assert [int(v) for v in seen] == [11, 12, 10, 21, 22, 20]


def test_iter_over_a_list_built_in_the_session(net):
    # nnsight 0.4's test_nested_iterator
    with net.session() as session:
        rows = session.apply(list)
        rows.append([0])
        rows.append([1])
        rows.append([2])
        flat = session.apply(list).save()
        with session.iter(rows) as row:
            with session.iter(row) as item:
                flat.append(item)
    assert flat == [0, 1, 2]


def test_iter_over_a_value_that_needs_a_trace_says_so(net, x):
    with pytest.raises(interlace.InterlaceError, match="needs the length of its values"):
        with net.session() as session:
            with net.trace(x):
                rows = net.output.tolist()
            with session.iter(rows):
                pass


def test_proxy_stop_ends_the_forward_after_that_value(net):
    # nnsight 0.4's test_stop_forward_pass_in_loop: `module.output.stop()` in each trace of a loop
    torch.manual_seed(3)
    inputs = [torch.rand(1, 3) for _ in range(3)]
    calls = []
    handle = net.module.head.register_forward_hook(lambda *args: calls.append(1))
    try:
        with net.session() as session:
            found = session.apply(list).save()
            with session.iter(torch.utils.data.DataLoader(inputs, batch_size=1)) as batch:
                with net.trace(batch):
                    hidden = net.layers[0].output
                    net.layers[0].output.stop()
                found.append(hidden)
    finally:
        handle.remove()
    assert calls == []  # the head never ran
    with torch.no_grad():
        expected = [net.module.layers[0](net.module.embed(i)) for i in inputs]
    assert len(found) == 3  # the DataLoader adds a batch dimension of 1
    assert all(torch.equal(f, e[None]) for f, e in zip(found, expected))


def test_remote_on_a_trace_inside_a_local_session_says_to_put_it_on_the_session(mlp, x):
    import types

    net = Model(mlp)
    stand_in = types.SimpleNamespace(run=lambda request, **options: None)  # a backend that is never reached
    with pytest.raises(interlace.InterlaceError, match="put remote=True on the session"):
        with net.session():
            with net.trace(x, backend=stand_in):
                net.layers[0].output.save()


def test_a_value_of_an_earlier_trace_as_a_later_trace_s_input(net, x):
    with net.session() as session:
        with net.trace(x):
            doubled = net.input * 2  # not saved: the session carries it to the next trace
        with net.trace(doubled):
            out = net.output.save()
    assert torch.equal(out, _alone(net.module, x * 2))
    # the recorder says which traces' inputs hold values of earlier traces: only those are walked for them
    assert [trace.inputs_hold_refs for trace in session.traces] == [False, True]

    with pytest.raises(interlace.InterlaceError, match=r"an input of trace 1 is the value of node %\d+ \(recorded at "
                       r".*test_session.py:\d+: never = net.input \* 2\), which was not computed \(a false condition"):
        with net.session():
            with net.trace(x) as tracer:
                with tracer.cond(net.input.sum() > 1e9):
                    never = net.input * 2
            with net.trace(never):
                net.output.save()
    assert_clean(net.module)
