"""The interleaver: interventions reach the model, invokes keep to their rows, early stop, errors."""

import gc
import sys
import weakref
from pathlib import Path

import pytest
import torch

import interlace
from interlace import Model, ProxyValueError
from interlace.backends.local import Interleaver
from interlace.backends.plan import Plan

from helpers import MLP, Table, assert_clean

sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))  # (last: its scripts shadow nothing)
from bytecodes import count as count_bytecodes  # noqa: E402  (what the benchmark counts is what a test holds)


def hooked(model, x, module, fn):
    """Run `model(x)` with a hand-written forward hook `fn(output) -> output` on `module`."""
    handle = module.register_forward_hook(lambda m, a, o: fn(o))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        handle.remove()


def test_trace_without_interventions_is_exactly_eager(mlp, x):
    net = Model(mlp)
    with net.trace(x):
        out = net.output.save()
    with torch.no_grad():
        assert torch.equal(out, mlp(x))


def test_in_place_change_reaches_downstream(mlp, x):
    net = Model(mlp)
    with net.trace(x):
        net.layers[1].output[:, 0] = 0
        net.layers[2].output[:, 1:3] += 1.5
        out = net.output.save()

    def zero(o):
        o[:, 0] = 0

    def add(o):
        o[:, 1:3] += 1.5

    h1 = mlp.layers[1].register_forward_hook(lambda m, a, o: zero(o))
    want = hooked(mlp, x, mlp.layers[2], lambda o: add(o))
    h1.remove()
    assert torch.equal(out, want)
    assert_clean(mlp)


def test_an_augmented_assignment_to_a_saved_value_keeps_the_name_saved(mlp, x):
    """`h = out.save(); h *= 2` binds `h` to the in-place operator's value (Python rebinds the name): a saved `h`
    stays saved, and holds the changed tensor, which the model went on with (nnterp's attention example:
    `p[..., 0] = 0; p /= p.sum(-1, keepdim=True)`)."""
    net = Model(mlp)
    with net.trace(x):
        h = net.layers[0].output.save()
        h *= 2
        p = net.layers[1].output.save()
        p[:, 0] = 0
        p /= p.sum(-1, keepdim=True)
        count = interlace.apply(int, 3).save()
        count += 1
        out = net.output.save()

    kept = {}

    def double(module, args, o):
        kept["h"] = o.mul_(2)

    def normalize(module, args, o):
        o[:, 0] = 0
        kept["p"] = o.div_(o.sum(-1, keepdim=True))

    handles = [mlp.layers[0].register_forward_hook(double), mlp.layers[1].register_forward_hook(normalize)]
    with torch.no_grad():
        want = mlp(x)
    for handle in handles:
        handle.remove()
    assert torch.equal(h, kept["h"]) and torch.equal(p, kept["p"]) and torch.equal(out, want)
    assert count == 4
    assert_clean(mlp)


@pytest.mark.parametrize("key", [(slice(None), -1), (0, slice(1, None, 2)), (Ellipsis, 3), (None, 1)],
                         ids=["last-column", "strided", "ellipsis", "new-axis"])
def test_augmented_assignment_to_an_index_is_the_hooks(mlp, x, key):
    """`out[k] += c` (getitem, +=, setitem): with a basic index the setitem would copy the view onto
    itself, so it is skipped; the numbers and the weights are those of the same line in a hook."""
    net = Model(mlp)
    with net.trace(x):
        net.layers[1].output[key] += 2.0
        part = net.layers[2].output[key]
        part *= 3.0
        net.layers[2].output[key] = part  # the same, spelled out
        out = net.output.save()

    def edit(o, factor, add):
        o[key] = o[key] * factor + add

    h1 = mlp.layers[1].register_forward_hook(lambda m, a, o: edit(o, 1.0, 2.0))
    want = hooked(mlp, x, mlp.layers[2], lambda o: edit(o, 3.0, 0.0))
    h1.remove()
    assert torch.equal(out, want)
    assert_clean(mlp)


def test_augmented_assignment_that_needs_its_store_still_stores(mlp, x):
    """Where the setitem is not a copy onto itself it runs: an advanced index (x[k] is a copy), a
    number in a dict (+= makes a new one), a tensor whose indexing copies, a tuple (which refuses item
    assignment, as in Python)."""
    net = Model(mlp)
    with net.trace(x):
        net.layers[1].output[[0, 1], 2] += 1.0
        counts = interlace.apply(dict, a=1)
        counts["a"] += 41
        counts = counts.save()
        out = net.output.save()
    want = hooked(mlp, x, mlp.layers[1], lambda o: o.__setitem__(([0, 1], 2), o[[0, 1], 2] + 1.0))
    assert torch.equal(out, want) and counts == {"a": 42}

    class Copying(torch.Tensor):  # indexing gives a copy, not a view: the store is what writes it
        def __getitem__(self, key):
            return super().__getitem__(key).clone()

    with net.trace(x):
        table = interlace.apply(lambda: torch.zeros(2, 3).as_subclass(Copying))
        table[0, :] += 1.0
        table = table.save()
    assert torch.equal(table.as_subclass(torch.Tensor), torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))

    with pytest.raises(interlace.ExecutionError, match="does not support item assignment"):
        with net.trace(x):
            pair = interlace.apply(tuple, [net.layers[1].output, net.layers[2].output])
            pair[0] += 1.0
    assert_clean(mlp)


def test_augmented_assignment_to_a_weight_is_undone(mlp, x):
    """`weight[k] += c` writes the weight through a view: the trace sees it, the model does not keep it."""
    net = Model(mlp)
    with net.trace(x):
        net.embed.weight[0, :] += 100.0
        changed = net.embed.output.save()
    with torch.no_grad():
        edited = mlp.embed.weight.clone()
        edited[0, :] += 100.0
        assert torch.equal(changed, torch.nn.functional.linear(x, edited, mlp.embed.bias))
    with net.trace(x):
        plain = net.embed.output.save()
    with torch.no_grad():
        assert torch.equal(plain, mlp.embed(x))
    before = mlp.embed.weight.detach().clone()
    with net.trace(x):
        weight = net.embed.weight
        weight[1, :] -= 5.0
        weight = weight.save()  # what the run made, not the weight put back after it
    want = before.clone()
    want[1, :] -= 5.0
    assert torch.equal(weight, want) and torch.equal(mlp.embed.weight.detach(), before)


# -- edits the hook does itself (Plan.edits) ----------------------------------------------------------
def _edits(tracer) -> list[str]:
    """The module paths whose edit `Plan.edits` lets the hook do itself, in the graph `tracer` recorded."""
    return sorted(path for path, calls in Plan(tracer.graph, 0, len(tracer.graph)).edits.items() if calls)


def test_an_edit_by_a_constant_is_done_in_the_hook_as_hand_written_hooks_do_it(mlp, x):
    """`out[k] op= c` and `out[k] = c`, `c` a constant, nothing else reading the module's value (saving it, before
    or after the edit, is no read): the hook does the edit itself, with the numbers of the same lines in hooks."""
    net = Model(mlp)
    steer = torch.linspace(-1.0, 1.0, 8)
    with net.trace(x) as tracer:
        net.layers[0].output[:, 1:] *= 0.5
        before = net.layers[1].output.save()  # (the module's value itself: edited below)
        net.layers[1].output[:, 0] = 0
        net.layers[2].output[:] += steer
        after = net.layers[2].output.save()
        out = net.output.save()
    assert _edits(tracer) == ["layers.0", "layers.1", "layers.2"]

    def hooks(module, args, o):  # (returns None: the output stays the tensor it wrote)
        if module is mlp.layers[0]:
            o[:, 1:] *= 0.5
        elif module is mlp.layers[1]:
            o[:, 0] = 0
            seen.append(o)
        else:
            o[:] += steer
            seen.append(o)

    seen = []
    handles = [layer.register_forward_hook(hooks) for layer in mlp.layers[:3]]
    want = hooked(mlp, x, mlp.head, lambda o: o)
    for handle in handles:
        handle.remove()
    assert torch.equal(out, want) and torch.equal(before, seen[0]) and torch.equal(after, seen[1])
    assert torch.equal(before[:, 0], torch.zeros(2))
    assert_clean(mlp)


def test_edits_that_read_a_value_or_whose_value_is_read_go_the_general_way_with_the_same_numbers(mlp, x):
    """A `c` that is a value of the graph, a second reader of the module's value (in graph order: it sees the
    edit before it and not the one after it), `output[0]` (which may warn) and an edit saved on the way are
    not the hook's own; they run node by node, as hooks would."""
    net = Model(mlp)
    with net.trace(x) as tracer:
        net.layers[0].output[:, 0] += net.embed.output[:, 1]
        h = net.layers[1].output
        h[:, 0] = 0
        before = h[:, 1].clone().save()
        h[:, 1] = 7.0
        net.layers[2].output[0] += 1.0
        last = net.layers[3].output
        part = last[:, 2]
        part += 3.0
        last[:, 2] = part
        part.save()
        out = net.output.save()
    assert _edits(tracer) == []

    def hooks(module, args, o):
        if module is mlp.layers[0]:
            o[:, 0] += embedded[:, 1]
        elif module is mlp.layers[1]:
            o[:, 0] = 0
            seen.append(o[:, 1].clone())
            o[:, 1] = 7.0
        elif module is mlp.layers[2]:
            o[0] += 1.0
        elif module is mlp.layers[3]:
            o[:, 2] += 3.0
            seen.append(o[:, 2])

    seen, embedded = [], None
    with torch.no_grad():
        embedded = mlp.embed(x)
    handles = [layer.register_forward_hook(hooks) for layer in mlp.layers]
    want = hooked(mlp, x, mlp.head, lambda o: o)
    for handle in handles:
        handle.remove()
    assert torch.equal(out, want) and torch.equal(before, seen[0]) and torch.equal(part, seen[1])
    assert_clean(mlp)


def test_an_edit_by_a_weights_memory_is_done_in_the_hook_and_leaves_the_weight_as_it_was(mlp, x, monkeypatch):
    """`c` of `out[k] op= c` / `out[k] = c` is a view of a weight: the edit reads it (the operators write their first
    argument only), so the hook does the edit, with a hand-written hook's numbers, and the weight is unchanged."""
    done_by_hooks, edit = [], Interleaver._edit
    monkeypatch.setattr(Interleaver, "_edit", lambda self, *args: done_by_hooks.append(edit(self, *args))
                        or done_by_hooks[-1])
    row, bias = mlp.layers[3].linear.weight.detach()[0], mlp.layers[3].linear.bias.detach()[:2]
    weight, bias_before = mlp.layers[3].linear.weight.detach().clone(), mlp.layers[3].linear.bias.detach().clone()
    net = Model(mlp)
    with net.trace(x):
        net.layers[0].output[:] += row
        net.layers[1].output[:, 0] = bias
        out = net.output.save()

    def hooks(module, args, o):
        if module is mlp.layers[0]:
            o[:] += row
        else:
            o[:, 0] = bias

    handles = [layer.register_forward_hook(hooks) for layer in mlp.layers[:2]]
    want = hooked(mlp, x, mlp.head, lambda o: o)
    for handle in handles:
        handle.remove()
    assert done_by_hooks == [True, True]
    assert torch.equal(out, want)
    linear = mlp.layers[3].linear
    assert torch.equal(linear.weight.detach(), weight) and torch.equal(linear.bias.detach(), bias_before)
    assert_clean(mlp)


def test_an_edit_of_an_output_that_is_a_weights_memory_is_undone_after_the_trace(x):
    """The plan lets the hook do the edit, but the value is a view of a weight: the edit goes the general way,
    which keeps the weight and puts it back after the run."""
    model = torch.nn.Sequential(Table(), torch.nn.Identity())
    before = model[0].table.detach().clone()
    net = Model(model)
    with net.trace(x) as tracer:
        net[0].output[:, 0] += 100.0
        out = net.output.save()
    assert _edits(tracer) == ["0"]
    want = before[:2].clone()
    want[:, 0] += 100.0
    assert torch.equal(out, want)
    assert torch.equal(model[0].table.detach(), before)
    assert_clean(model)


def test_a_value_in_a_weights_memory_that_a_later_trace_reads_keeps_the_earlier_traces_edit(x):
    """The first trace edits a module output that is a view of a weight (the run copies the weight and puts it
    back after it); the second trace reads that output as the first trace left it, not the weight put back."""
    model = torch.nn.Sequential(Table(), torch.nn.Identity())
    before = model[0].table.detach().clone()
    net = Model(model)
    with net.session():
        with net.trace(x):
            h = net[0].output
            h[:, 0] += 100.0
        with net.trace(x):
            out = (net.output + h).save()
    edited = before[:2].clone()
    edited[:, 0] += 100.0
    assert torch.equal(out, before[:2] + edited)
    assert torch.equal(model[0].table.detach(), before)
    assert_clean(model)


def test_a_sessions_later_trace_does_its_edit_in_the_hook_with_the_earlier_traces_values_at_hand(
        mlp, x, monkeypatch):
    done_by_hooks, edit = [], Interleaver._edit

    def counted(self, *args):
        done_by_hooks.append(edit(self, *args))
        return done_by_hooks[-1]

    monkeypatch.setattr(Interleaver, "_edit", counted)
    net = Model(mlp)
    with net.session():
        with net.trace(x):
            first = net.layers[0].output.save()
        with net.trace(x):
            net.layers[1].output[:, 0] = 0
            out = (net.output + first.sum()).save()  # (reads the first trace's value)
    want = hooked(mlp, x, mlp.layers[1], lambda o: o.__setitem__((slice(None), 0), 0))
    assert done_by_hooks == [True]
    assert torch.equal(out, want + first.sum())
    assert_clean(mlp)


def test_an_edit_whose_value_a_later_trace_of_a_session_reads_is_kept_for_it(mlp, x):
    net = Model(mlp)
    with net.session():
        with net.trace(x):
            h = net.layers[1].output
            part = h[:, 0]
            part += 1.0
            h[:, 0] = part
        with net.trace(x):
            later = (part * 2.0).save()
    want = hooked(mlp, x, mlp.layers[1], lambda o: o)  # (the head's output; the layer's is read below)
    with torch.no_grad():
        layer_out = mlp.layers[1](mlp.layers[0](mlp.embed(x)))
    assert want is not None and torch.equal(later, (layer_out[:, 0] + 1.0) * 2.0)
    assert_clean(mlp)


def test_replace_output_and_input(mlp, x):
    net = Model(mlp)
    with net.trace(x):
        net.layers[0].output = net.layers[0].output * 0.5
        out = net.output.save()
    assert torch.equal(out, hooked(mlp, x, mlp.layers[0], lambda o: o * 0.5))

    with net.trace(x):
        net.head.input = torch.zeros(2, 8)
        zeroed = net.output.save()
    assert torch.allclose(zeroed, mlp.head.bias.detach().expand(2, -1))


def test_input_and_inputs(mlp, x):
    net = Model(mlp)
    with net.trace(x):
        first = net.layers[2].input.save()
        args, kwargs = net.layers[2].inputs[0], net.layers[2].inputs[1]
        args = args.save()
        kwargs = kwargs.save()
        previous = net.layers[1].output.save()
    assert torch.equal(first, previous)
    assert isinstance(args, tuple) and torch.equal(args[0], previous) and kwargs == {}


def test_inputs_unpack_into_args_and_kwargs_as_nnsight_code_writes_it(mlp, x):
    net = Model(mlp)
    with net.trace(x):
        args, kwargs = net.layers[2].inputs  # (args, kwargs): a pair, known before the model runs
        args[0][:, 0] = 0  # changes the input the layer sees
        seen = args[0].save()
        kwargs = kwargs.save()
        out = net.output.save()

    def zero_first_column(module, args):
        changed = args[0].clone()
        changed[:, 0] = 0
        return (changed,)

    handle = mlp.layers[2].register_forward_pre_hook(zero_first_column)
    with torch.no_grad():
        want = mlp(x)
    handle.remove()
    assert torch.equal(out, want) and kwargs == {} and torch.count_nonzero(seen[:, 0]) == 0
    with pytest.raises(ProxyValueError, match="index it"):  # a module's output: its length is unknown
        with net.trace(x):
            first, second = net.layers[2].output
    assert_clean(mlp)


class Shifts(torch.nn.Module):
    def forward(self, x, *, scale, shift):
        return x * scale + shift


class CallsWithKeywords(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.shift = Shifts(), torch.nn.Parameter(torch.arange(3.0))

    def forward(self, x):
        return self.inner(x, scale=2.0, shift=self.shift * 1)


def test_the_keywords_of_inputs_unpack_with_double_star_while_scanning_and_say_how_otherwise():
    x3 = torch.ones(2, 3)
    module = CallsWithKeywords()
    seen = {}
    handle = module.inner.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        module(x3)
    handle.remove()
    net = Model(module)
    with net.trace(x3, scan=True):  # scanning knows the keyword names, as it knows a tuple's length
        _, kwargs = net.inner.inputs
        unpacked = {**kwargs}
        names = sorted(unpacked)
        shift = unpacked["shift"].save()
        also = dict(**kwargs)["scale"].save()
    assert names == sorted(seen) and torch.equal(shift, seen["shift"]) and also == seen["scale"]
    for unpack in (lambda kwargs: {**kwargs}, lambda kwargs: dict(**kwargs)):
        with pytest.raises(interlace.InterlaceError, match=r"unpacked .* known only when the model runs. Read one "
                                                           r"value as kwargs\['name'\].*scan=True"):
            with net.trace(x3):
                unpack(net.inner.inputs[1])
    assert_clean(module)


class KeepsDropout(torch.nn.Module):
    """Holds a Dropout module but calls the function with its rate, as GPT-2's attention does with attn_dropout."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)
        self.dropout = torch.nn.Dropout(0.0)

    def forward(self, x):
        return torch.nn.functional.dropout(self.linear(x).softmax(-1), self.dropout.p, self.training)


def test_a_submodule_its_parent_never_calls_says_to_look_at_the_parents_source(x):
    model = torch.nn.Sequential(KeepsDropout()).eval()
    net = Model(model)
    with pytest.raises(interlace.OutOfOrderError, match=r"did not run at all.*`\.source` of 0"):
        with net.trace(x):
            net[0].dropout.input.save()  # nnsight's attention-pattern recipe on GPT-2
    with net.trace(x):  # the advice: a call site of the parent's forward
        weights = net[0].source.dropout_0.input.save()
    with torch.no_grad():
        assert torch.equal(weights, model[0].linear(x).softmax(-1))
    assert_clean(model)


def test_invokes_run_one_batched_forward_and_keep_to_their_rows(mlp):
    torch.manual_seed(3)
    a, b = torch.randn(1, 3), torch.randn(2, 3)
    calls = []
    handle = mlp.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    net = Model(mlp)
    with net.trace() as tracer:
        with tracer.invoke(a):
            ha = net.layers[1].output.save()
            net.layers[2].output[:] = 0
            oa = net.output.save()
        with tracer.invoke(b):
            hb = net.layers[1].output.save()
            ob = net.output.save()
    handle.remove()
    assert calls == [3]
    with torch.no_grad():
        assert torch.allclose(ha, Model_capture(mlp, a, 1))
        assert torch.allclose(hb, Model_capture(mlp, b, 1))
        assert torch.allclose(ob, mlp(b))  # the other invoke's change did not leak
        assert torch.allclose(oa, mlp.head(mlp.layers[3](torch.zeros(1, 8))))
    assert ha.shape == (1, 8) and hb.shape == (2, 8)


def Model_capture(model, x, layer):
    seen = {}
    handle = model.layers[layer].register_forward_hook(lambda m, a, o: seen.setdefault("o", o))
    model(x)
    handle.remove()
    return seen["o"]


def test_values_flow_between_invokes(mlp):
    torch.manual_seed(4)
    a, b = torch.randn(1, 3), torch.randn(1, 3)
    net = Model(mlp)
    with net.trace() as tracer:
        with tracer.invoke(a):
            cat = net.layers[1].output.save()
        with tracer.invoke(b):
            net.layers[1].output = cat
            patched = net.output.save()
    with torch.no_grad():
        want = hooked(mlp, a, mlp.layers[3], lambda o: o)
        assert torch.allclose(patched, want)


def test_calling_an_envoy_runs_its_module(mlp, x):
    net = Model(mlp)
    with net.trace(x):
        direct = net.head(net.layers[1].output).save()
        h1 = net.layers[1].output.save()
    assert torch.equal(direct, mlp.head(h1).detach())


class Twice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.shared(torch.relu(self.shared(x)))


def test_module_called_twice_next_and_at_call():
    torch.manual_seed(0)
    model = Twice()
    net = Model(model)
    x = torch.randn(2, 4)
    with net.trace(x):
        first = net.shared.output.save()
        second = net.shared.next().output.save()
    with net.trace(x):
        also_second = net.shared.at_call(1).output.save()
        net.shared.at_call(0).output = torch.zeros(2, 4)
        out = net.output.save()
    with torch.no_grad():
        f = model.shared(x)
        assert torch.equal(first, f)
        assert torch.equal(second, model.shared(torch.relu(f)))
        assert torch.equal(out, model.shared(torch.zeros(2, 4)))
    assert torch.equal(also_second, out)  # call 1 saw the replaced call 0
    with net.trace(x):
        net.shared.next()  # moves the module to call 1; at_call names a call whatever .next() did
        by_next = net.shared.output.save()
        by_number = net.shared.at_call(0).output.save()
    assert torch.equal(by_next, second) and torch.equal(by_number, first)


class Thrice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.shared(self.shared(torch.relu(self.shared(x))))


def test_one_hook_keeps_one_call_and_edits_another_of_the_same_module_by_its_call_number():
    """A module called three times, its first call saved (`Plan.kept`), its second edited (`Plan.edits`), the
    third read the general way: the one hook tells them apart by call, with a hand-written hook's numbers."""
    torch.manual_seed(0)
    model = Thrice()
    net = Model(model)
    x, steer = torch.randn(2, 4), torch.linspace(-1.0, 1.0, 3)
    with net.trace(x) as tracer:
        first = net.shared.output.save()
        net.shared.at_call(1).output[:, 1:] += steer
        third = (net.shared.at_call(2).output * 2).save()
    plan = Plan(tracer.graph, 0, len(tracer.graph))
    assert list(plan.kept["shared"]) == [0] and list(plan.edits["shared"]) == [1]

    def outputs(edit: bool) -> list:
        calls = []

        def hook(module, args, o):
            calls.append(o)
            if edit and len(calls) == 2:
                o[:, 1:] += steer

        handle = model.shared.register_forward_hook(hook)
        with torch.no_grad():
            model(x)
        handle.remove()
        return calls

    want, unedited = outputs(edit=True), outputs(edit=False)
    assert torch.equal(first, want[0]) and torch.equal(third, want[2] * 2)
    assert not torch.equal(third, unedited[2] * 2)
    assert_clean(model)


def test_apply_and_log(mlp, x, capsys):
    net = Model(mlp)
    seen = []
    with net.trace(x) as tracer:
        h = net.layers[0].output
        norm = interlace.apply(lambda t: seen.append(t.shape) or float(t.norm()), h).save()
        tracer.log("norm is", norm)
    assert seen == [torch.Size([2, 8])]
    assert isinstance(norm, float)
    assert f"norm is {norm}" in capsys.readouterr().out


def test_list_changes_and_logs_run_in_the_order_written(mlp, x, capsys):
    """Appends of constants are ready before the model runs, and of a late layer after an early one: the
    list must still hold them as written, and a read of it sees every change recorded before."""
    net = Model(mlp)
    with net.trace(x) as tracer:
        items = interlace.list().save()
        items.append("layer 3")
        items.append(net.layers[3].output[0, 0])
        items.extend(["layer 0"])
        items.insert(4, net.layers[0].output[0, 0])
        last = items[-1].save()
        popped = items.pop(0).save()
        count = items.count("layer 0").save()
        tracer.log("1: layer 3", net.layers[3].output[0, 0])
        tracer.log("2: layer 0", net.layers[0].output[0, 0])
        tracer.log("3: no value")
    with torch.no_grad():
        h0 = mlp.layers[0](mlp.embed(x))
        h3 = mlp.layers[3](mlp.layers[2](mlp.layers[1](h0)))
    assert popped == "layer 3" and count == 1
    assert [type(item) for item in items] == [torch.Tensor, str, torch.Tensor]
    assert torch.equal(items[0], h3[0, 0]) and items[1] == "layer 0" and torch.equal(items[2], h0[0, 0])
    assert torch.equal(last, h0[0, 0])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["1:", "2:", "3:"]


def test_cond_runs_block_only_when_true(mlp, x):
    net = Model(mlp)
    for threshold, expect_change in [(-1e9, True), (1e9, False)]:
        with net.trace(x) as tracer:
            h = net.layers[0].output
            with tracer.cond(h.sum() > threshold):
                net.layers[0].output[:] = 0
            out = net.output.save()
        with torch.no_grad():
            changed = not torch.equal(out, mlp(x))
        assert changed == expect_change


def test_early_stop_skips_later_layers_and_stop(mlp, x):
    ran = []
    handles = [m.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, m in enumerate(mlp.layers)]
    net = Model(mlp)
    with net.trace(x):
        h = net.layers[1].output.save()
    assert ran == [0, 1]
    ran.clear()
    with net.trace(x, early_stop=False):
        net.layers[1].output.save()
    assert ran == [0, 1, 2, 3]
    ran.clear()
    with net.trace(x) as tracer:
        net.layers[0].output.save()
        tracer.stop()
    assert ran == [0]
    for handle in handles:
        handle.remove()
    assert isinstance(h, torch.Tensor)


def test_skip_uses_value_without_running_module(mlp, x):
    ran = []
    handle = mlp.layers[2].linear.register_forward_hook(lambda *a: ran.append(1))
    net = Model(mlp)
    with net.trace(x):
        net.layers[2].skip(net.layers[2].input)
        out = net.output.save()
    handle.remove()
    assert ran == []
    with torch.no_grad():
        h = mlp.layers[1](mlp.layers[0](mlp.embed(x)))
        want = mlp.head(mlp.layers[3](h))
    assert torch.equal(out, want)
    assert_clean(mlp)


def test_reading_inside_a_skipped_module_says_it_is_skipped(mlp, x):
    net = Model(mlp)
    with pytest.raises(interlace.OutOfOrderError, match="layers.2 is skipped \\(.skip\\(\\)\\), so the modules inside"):
        with net.trace(x):
            net.layers[2].skip(net.layers[2].input)
            net.layers[2].linear.output.save()
    assert_clean(mlp)


def forward_keeping(model, x, module):
    """(the model's output, `module`'s output) of a plain forward with autograd: the reference."""
    store = {}
    handle = module.register_forward_hook(lambda m, a, o: store.setdefault("h", o))
    out = model(x)
    handle.remove()
    return out, store["h"]


def test_gradients_read_and_set():
    torch.manual_seed(0)
    model = MLP()
    net = Model(model)
    x = torch.randn(2, 3)
    with net.trace(x):
        h = net.layers[1].output
        grad = h.grad.save()
        loss = net.output.sum()
        loss.backward()
    out, hidden = forward_keeping(model, x, model.layers[1])
    want = torch.autograd.grad(out.sum(), hidden)[0]
    assert torch.allclose(grad, want)
    assert all(p.grad is None for p in model.parameters())

    with net.trace(x):
        net.layers[1].output.grad = net.layers[1].output.grad * 0
        embed_grad = net.embed.output.grad.save()
        net.output.sum().backward()
    assert torch.count_nonzero(embed_grad) == 0
    assert_clean(model)


def test_gradients_of_an_invokes_rows_in_a_batch_of_several():
    """Each invoke's value is a view of its rows, which the loss never goes through: its gradient is
    the batch's, cut to those rows; setting it changes those rows only."""
    torch.manual_seed(0)
    model = MLP()
    net = Model(model)
    x = torch.randn(3, 3)
    with net.trace() as tracer:
        with tracer.invoke(x[:1]):
            first = net.layers[1].output.grad.save()
        with tracer.invoke(x[1:]):
            second = net.layers[1].output.grad.save()
            (net.output ** 2).sum().backward()  # this invoke's rows of the output only
    out, hidden = forward_keeping(model, x, model.layers[1])
    want = torch.autograd.grad((out[1:] ** 2).sum(), hidden)[0]
    assert torch.count_nonzero(first) == 0 and first.shape == (1, 8)
    assert second.shape == (2, 8) and torch.allclose(second, want[1:])

    with net.trace() as tracer:
        with tracer.invoke(x[:1]):
            net.layers[1].output.grad = net.layers[1].output.grad * 0
            zeroed = net.embed.output.grad.save()
        with tracer.invoke(x[1:]):
            embed_grad = net.embed.output.grad.save()
        net.output.sum().backward()  # the whole batch
    out, hidden = forward_keeping(model, x, model.embed)
    want = torch.autograd.grad(out.sum(), hidden)[0]
    assert torch.count_nonzero(zeroed) == 0 and torch.count_nonzero(want[:1])
    assert torch.allclose(embed_grad, want[1:])  # the other invoke's zeroed rows did not reach these
    assert_clean(model)
    assert all(p.grad is None for p in model.parameters())


class FlatLinear(torch.nn.Module):
    """A linear layer run on the flattened batch and viewed back, as GPT-2's Conv1D is: its output is a view."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.linear(x.reshape(-1, 8)).view(x.shape)


def test_gradients_of_an_invokes_rows_of_an_output_that_is_a_view():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), FlatLinear(), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    net = Model(model)
    x = torch.randn(3, 2, 3)
    with net.trace() as tracer:
        with tracer.invoke(x[:1]):
            first = net[1].output.grad.save()
        with tracer.invoke(x[1:]):
            second = net[1].output.grad.save()
            (net.output ** 2).sum().backward()  # this invoke's rows of the output only
    out, viewed = forward_keeping(model, x, model[1])
    want = torch.autograd.grad((out[1:] ** 2).sum(), viewed)[0]
    assert torch.count_nonzero(first) == 0 and first.shape == (1, 2, 8)
    torch.testing.assert_close(second, want[1:])

    with net.trace() as tracer:
        with tracer.invoke(x[:1]):
            net[1].output.grad = net[1].output.grad * 0
            zeroed = net[0].output.grad.save()
        with tracer.invoke(x[1:]):
            embed_grad = net[0].output.grad.save()
        net.output.sum().backward()  # the whole batch
    out, embedded = forward_keeping(model, x, model[0])
    want = torch.autograd.grad(out.sum(), embedded)[0]
    assert torch.count_nonzero(zeroed) == 0 and torch.count_nonzero(want[:1])
    torch.testing.assert_close(embed_grad, want[1:])  # the other invoke's zeroed rows did not reach these

    with net.trace() as tracer:
        with tracer.invoke(x[:1]):
            pass
        with tracer.invoke(x[1:]):
            written = net[1].output.grad.save()  # asked for before an in-place write: the written value's
            net[1].output[:, 0] = 0
            net.output.sum().backward()

    def write(module, args, output):
        output = output.clone()
        output[1:, 0] = 0
        return output

    handle = model[1].register_forward_hook(write)
    out, viewed = forward_keeping(model, x, model[1])
    handle.remove()
    torch.testing.assert_close(written, torch.autograd.grad(out[1:].sum(), viewed)[0][1:])
    assert_clean(model)
    assert all(p.grad is None for p in model.parameters())


def test_several_backward_passes_each_grad_belongs_to_the_next_backward():
    torch.manual_seed(0)
    model = MLP()
    net = Model(model)
    x = torch.randn(2, 3)
    with net.trace(x):
        h = net.layers[1].output
        first = h.grad.save()
        net.output.sum().backward(retain_graph=True)
        second = h.grad.save()
        (net.output ** 2).sum().backward(retain_graph=True)
        third = h.grad.save()
        net.output[:, 0].sum().backward()
    out, hidden = forward_keeping(model, x, model.layers[1])
    for got, loss in ((first, out.sum()), (second, (out ** 2).sum()), (third, out[:, 0].sum())):
        want = torch.autograd.grad(loss, hidden, retain_graph=True)[0]
        assert torch.allclose(got, want)
    assert all(p.grad is None for p in model.parameters())
    assert_clean(model)


def test_a_second_backward_through_a_freed_graph_keeps_autograds_advice_only(mlp, x):
    net = Model(mlp)
    with pytest.raises(interlace.ExecutionError) as caught:
        with net.trace(x):
            net.output.sum().backward()
            net.output.sum().backward()  # the graph was freed by the first
    message = str(caught.value)
    assert "retain_graph=True" in message and "while running .backward(...)" in message
    assert "Check the shapes and indices" not in message  # (not what is wrong)
    assert_clean(mlp)


def test_a_weights_requires_grad_set_for_one_run_is_put_back(x):
    """A frozen model, one weight's gradient wanted: requires_grad_() in the trace is for that run only."""
    torch.manual_seed(0)
    model = MLP().requires_grad_(False)
    model.head.bias.requires_grad_(True)  # one trainable parameter, to see flags come back both ways
    net = Model(model)
    with net.trace(x):
        weight = net.embed.weight
        weight.requires_grad_()
        net.head.bias.requires_grad_(False)
        grad = weight.grad.save()
        net.output.sum().backward()
    reference = model.embed.weight.detach().clone().requires_grad_()
    with torch.enable_grad():
        h = torch.nn.functional.linear(x, reference, model.embed.bias)
        for layer in model.layers:
            h = layer(h)
        want = torch.autograd.grad(model.head(h).sum(), reference)[0]
    torch.testing.assert_close(grad, want)
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["head.bias"]
    assert all(p.grad is None for p in model.parameters())
    assert_clean(model)


def test_a_grad_on_a_frozen_model_says_how_to_get_it_and_the_advice_works(x):
    torch.manual_seed(0)
    model = MLP().requires_grad_(False)
    net = Model(model)
    with pytest.raises(interlace.InterlaceError, match="Call .requires_grad_\\(\\) on it in the trace"):
        with net.trace(x):
            net.layers[1].output.grad.save()
            net.output.sum().backward()
    with net.trace(x):
        h = net.layers[1].output
        h.requires_grad_()
        grad = h.grad.save()
        net.output.sum().backward()
    with torch.enable_grad():
        hidden = model.layers[1](model.layers[0](model.embed(x))).requires_grad_()
        out = model.head(model.layers[3](model.layers[2](hidden)))
        torch.testing.assert_close(grad, torch.autograd.grad(out.sum(), hidden)[0])
    assert_clean(model)


def test_a_grad_after_the_last_backward_is_a_clear_error(mlp, x):
    net = Model(mlp)
    with pytest.raises(interlace.OutOfOrderError, match="read .grad before the .backward\\(\\) that computes it"):
        with net.trace(x):
            h = net.layers[1].output
            net.output.sum().backward()
            h.grad.save()


def test_a_grad_where_gradients_are_off_says_so(mlp, x):
    net = Model(mlp)
    with pytest.raises(interlace.InterlaceError, match="gradients are off in this run .*torch.no_grad") as info:
        with torch.no_grad(), net.trace(x):
            h = net.layers[1].output
            g = h.grad.save()  # the line named
            net.output.sum().backward()
    assert "g = h.grad.save()  # the line named" in str(info.value)
    with net.trace(x):  # with gradients on, the same lines work
        h = net.layers[1].output
        g = h.grad.save()
        net.output.sum().backward()
    assert g.shape == (2, 8)


def test_reading_a_later_module_to_change_an_earlier_one_is_an_error(mlp, x):
    net = Model(mlp)
    with pytest.raises(interlace.OutOfOrderError) as info:
        with net.trace(x):
            net.layers[0].output[:] = net.layers[3].output
    message = str(info.value)
    assert "layers.3.output" in message and "layers.0.output" in message
    assert "test_local.py" in message
    assert_clean(mlp)


def test_shape_error_names_the_user_line_and_module(mlp, x):
    net = Model(mlp)
    with pytest.raises(interlace.ExecutionError) as info:
        with net.trace(x):
            net.layers[1].output[:, 0] = torch.ones(5)  # wrong shape
    message = str(info.value)
    assert "test_local.py" in message and "torch.ones(5)" in message
    # what the operation was handed, tensors by shape: torch's message alone does not say which is which
    assert "operator.setitem(...) on (Tensor[2, 8] float32, (:, 0), Tensor[5] float32) in the hook of layers.1 " \
        "(output, call 0)" in message
    assert_clean(mlp)
    with pytest.raises(interlace.ExecutionError) as info:  # torch names a dimension of its own view here
        with net.trace(x):
            net.layers[0].output[:, torch.tensor([9])].save()
    assert "dimension 0 with size 8" in str(info.value)
    assert "operator.getitem(...) on (Tensor[2, 8] float32, (:, Tensor[1] int64 = [9]))" in str(info.value)
    with pytest.raises(interlace.ExecutionError) as info:  # (an edit the hook does itself: see Plan.edits)
        with net.trace(x):
            net.layers[2].output[:, 1] += torch.ones(3)  # wrong shape too
    message = str(info.value)
    assert "torch.ones(3)  # wrong shape too" in message and "layers.2 (output, call 0)" in message
    assert "operator.iadd(...) on (Tensor[2] float32, Tensor[3] float32)" in message
    assert_clean(mlp)
    with torch.no_grad():  # the model still works as before
        with net.trace(x):
            out = net.output.save()
        assert torch.equal(out, mlp(x))


def test_a_misspelt_tensor_method_names_the_closest_ones(mlp, x):
    net = Model(mlp)
    with pytest.raises(interlace.ExecutionError) as info:
        with net.trace(x):
            net.layers[1].output.sofmax(-1).save()  # a typo
    message = str(info.value)
    assert "net.layers[1].output.sofmax(-1).save()  # a typo" in message
    assert "Tensor has no method 'sofmax'; did you mean 'softmax'" in message
    assert_clean(mlp)


def test_module_never_reached_is_an_error(mlp, x):
    net = Model(mlp)
    with pytest.raises(interlace.OutOfOrderError, match="never reached.*ran 1 time"):
        with net.trace(x):
            net.layers[0].next().output.save()
    assert_clean(mlp)


class Broken(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(2, 2)

    def forward(self, x):
        self.first(x)
        raise ValueError("boom")


def test_exception_inside_the_model():
    model = Broken()
    net = Model(model)
    with pytest.raises(interlace.ModelError, match="ValueError: boom.*waiting for <root>.output"):
        with net.trace(torch.ones(1, 2)):
            net.first.output.save()
            net.output.save()
    assert_clean(model)


def test_freed_values(mlp, x):
    net = Model(mlp)
    with net.trace(x) as tracer:
        for layer in net.layers:
            layer.output.sum()
        saved = net.head.output.save()
    from interlace.backends.local import Interleaver

    interleaver = Interleaver(tracer.graph, mlp, [(0, 2)], 2)
    interleaver.run(lambda: mlp(x))
    assert set(interleaver.values) <= {len(tracer.graph) - 1}  # only the saved head output


def _saved_in_trace(net, x):
    with net.trace(x):
        saved = net.layers[1].output.save()
        net.layers[2].output[:] = net.layers[2].output * 2
    return saved


def _saved_in_session(net, x):
    with net.session():
        with net.trace(x):
            first = net.layers[1].output
        with net.trace(x):
            net.layers[1].output = first
            saved = net.layers[1].output.save()
    return saved


@pytest.mark.parametrize("experiment", [_saved_in_trace, _saved_in_session])
def test_values_are_freed_without_the_garbage_collector(mlp, x, experiment):
    """No reference cycle keeps a trace's activations alive once the user's function returns."""
    net = Model(mlp)
    gc.disable()
    try:
        alive = weakref.ref(experiment(net, x))
        assert alive() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("work", ["nothing", "saves", "edits", "a weight's edit"])
def test_what_a_trace_runs_beyond_the_forward_is_the_same_on_a_deep_model_as_on_a_shallow_one(work):
    """A trace's own work follows what it touches, never the model's size (issue 19): no walk over modules or
    weights per trace. Counted in bytecodes (a time could not tell 2 blocks from 16 on these machines)."""
    steer = torch.full((8,), 0.5)

    def added(depth: int, items: int) -> int:
        torch.manual_seed(0)
        module, x = MLP(depth=depth), torch.randn(1, 4, 3)  # (a batch of 4 positions, as tokens)
        net = Model(module)

        def bare():
            with torch.no_grad():
                module(x)

        def traced():
            with net.trace(x, early_stop=False):
                for i in range(items):
                    if work == "saves":
                        net.layers[i].output.save()
                    elif work == "edits":
                        net.layers[i].output[:, -1] += steer
                    else:
                        net.layers[i].linear.bias[:2] += 1.0  # copied first, put back after the run
        return count_bytecodes(traced) - count_bytecodes(bare)

    items = 0 if work == "nothing" else 2
    shallow, deep = added(2, items), added(16, items)
    assert shallow == deep, f"{work}: {shallow} bytecodes beyond the forward on 2 blocks, {deep} on 16"
    assert shallow > 0  # (the count sees interlace's frames)
