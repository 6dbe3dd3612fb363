"""Local writes to weights: undone after the trace, found through a per-model index that stays current."""

import gc
import weakref

import pytest
import torch

import interlace
from interlace.backends.limits import Limits
from interlace.backends.serialize import deserialize_request, serialize_graph
from interlace.backends.tree import ModelTree

from helpers import MLP, Table, tiny, tiny_tokenizer


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.positions = Table()
        self.head = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.head(x + self.positions(x))


def _reference(net, x, change):
    """The output with `change` applied to a copy of positions' output, by a hand-written hook."""
    handle = net.positions.register_forward_hook(lambda m, a, out: change(out.clone()))
    try:
        with torch.no_grad():
            return net(x)
    finally:
        handle.remove()


def _zero_row(out):
    out[0] = 0
    return out


def test_a_write_into_a_module_value_that_is_a_weight_is_undone():
    torch.manual_seed(0)
    module, x = Net().eval(), torch.randn(2, 3)
    before = module.positions.table.detach().clone()
    net = interlace.Model(module)
    with net.trace(x):
        net.positions.output[0] = 0  # the output is a view of positions.table
        out = net.output.save()
    assert torch.equal(out, _reference(module, x, _zero_row))  # the run saw the write
    assert torch.equal(module.positions.table, before)  # and the weight is as it was


def test_the_index_is_found_once_and_again_when_the_model_changes():
    torch.manual_seed(0)
    module, x = Net().eval(), torch.randn(2, 3)
    net = interlace.Model(module)

    def zero_row_in_a_trace():
        before = module.positions.table.detach().clone()
        with net.trace(x):
            net.positions.output[0] = 0
            out = net.output.save()
        assert torch.equal(out, _reference(module, x, _zero_row))
        assert torch.equal(module.positions.table, before)

    zero_row_in_a_trace()
    index = ModelTree.of(module)
    zero_row_in_a_trace()
    assert ModelTree.of(module) is index  # not found again for a second trace

    module.positions.table = torch.nn.Parameter(torch.full((4, 3), 5.0))  # a new weight, registered
    assert ModelTree.of(module) is not index
    zero_row_in_a_trace()

    index = ModelTree.of(module)
    module.to(torch.float64)  # every weight moves to new storage, registering nothing
    x = x.double()
    assert ModelTree.of(module) is not index
    zero_row_in_a_trace()


def test_steering_an_activation_copies_no_weight():
    torch.manual_seed(0)
    module, x = Net().eval(), torch.randn(2, 3)
    net = interlace.Model(module)
    copies = []
    original = torch.UntypedStorage.clone
    torch.UntypedStorage.clone = lambda self, *a, **k: copies.append(self) or original(self, *a, **k)
    try:
        with net.trace(x):
            net.head.output[:, 0] += 1.0
            steered = net.output.save()
    finally:
        torch.UntypedStorage.clone = original
    with torch.no_grad():
        expected = module(x)
    expected[:, 0] += 1.0
    assert torch.equal(steered, expected)
    assert copies == []


class Sliced(torch.nn.Module):
    """A forward that slices its layers, as Llama's does (`self.layers[: n]`: a new ModuleList each call)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(3, 3) for _ in range(2))

    def forward(self, x):
        for layer in self.layers[:2]:
            x = layer(x)
        return x


def test_the_tree_is_kept_across_forwards_that_make_modules_and_listed_again_when_the_model_gains_one():
    module, x = Sliced().eval(), torch.randn(2, 3)
    net = interlace.Model(module)
    with net.trace(x):
        first = net.layers[0].output.save()
    tree = ModelTree.of(module)
    torch.nn.Linear(3, 3)  # a module made elsewhere registers its own weights
    with net.trace(x):
        net.layers[1].output.save()
    assert ModelTree.of(module) is tree  # the forward's new ModuleList changed nothing of the model
    assert torch.equal(first, module.layers[0](x))
    module.layers.append(torch.nn.Linear(3, 3))  # the model itself gains a module
    fresh = ModelTree.of(module)
    assert fresh is not tree and "layers.2.weight" in [name for name, _ in fresh.weights]


def _traced_every_way(module: torch.nn.Module) -> weakref.ref:
    """Wrap `module`, run it through a local trace that writes a weight, a `.source` read of the root's forward and
    an untrusted run; returns a weak reference to it (everything else made here goes when this returns)."""
    x = torch.randn(2, 3)
    net = interlace.Model(module)
    with net.trace(x) as tracer:
        net.head.weight[:] = 0  # copied first, put back after the run
        net.source.embed_0.output.save()  # rewrites the root's forward: a method of it in its own dict
        net.output.save()
    request = deserialize_request(serialize_graph(tracer.graph, tracer.invokes, options=tracer.spec(0).options))
    with net.trace(x) as tracer:
        net.layers[0].output.save()
    request = deserialize_request(serialize_graph(tracer.graph, tracer.invokes, options=tracer.spec(0).options))
    net.run(request, untrusted=True, limits=Limits())
    assert ModelTree._cache.get(module) is not None
    return weakref.ref(module)


def test_a_model_traced_in_every_way_is_freed_when_its_last_reference_goes():
    """The module-wide cache of trees is keyed by the model, weakly: a tree holding its model (or the model's own
    dict) would keep every model a sweep over checkpoints or seeds traced alive, weights and all."""
    torch.manual_seed(0)
    for gone in (_traced_every_way(MLP().eval()), _generated_with_steering()):
        gc.collect()
        assert gone() is None


def _generated_with_steering() -> weakref.ref:
    # (in a function: before Python 3.13, the names a trace binds are written through the frame's dict of locals,
    # which holds every local until the frame ends, `del` or not)
    lm = interlace.StandardizedTransformer(tiny("llama"), tokenizer=tiny_tokenizer())
    with lm.generate("w5 w6", max_new_tokens=2) as tracer:
        with tracer.all():
            lm.steer(1, torch.ones(32))
        lm.layers_output[0].save()
    return weakref.ref(lm.module)


def test_a_module_called_on_a_weight_that_writes_it_in_place_is_undone_after_the_trace():
    """`model.act(weight)` where act is an in-place ReLU: the module's operator writes the weight it was handed."""
    torch.manual_seed(0)
    module, x = Net().eval(), torch.randn(2, 3)
    module.act = torch.nn.ReLU(inplace=True)  # (not in the forward: called by the graph)
    net = interlace.Model(module)
    before = module.head.weight.detach().clone()
    with net.trace(x):
        changed = net.act(net.head.weight).clone().save()
    assert torch.equal(changed, before.relu()) and not torch.equal(changed, before)  # the write happened in the run
    assert torch.equal(module.head.weight, before)  # and was put back


@pytest.mark.parametrize("write", [
    lambda w: torch.nn.functional.relu(w, True),
    lambda w: torch.nn.functional.hardtanh(w, -0.1, 0.1, True),
    lambda w: torch.nn.functional.leaky_relu(w[0], 0.5, True),  # through a view of the weight
], ids=["relu", "hardtanh", "leaky_relu_of_a_row"])
def test_a_function_that_writes_a_weight_in_place_is_undone_after_the_trace(write):
    """No name says that `F.relu(w, True)` writes `w`; the operator's schema does, and the weight is copied
    before it and put back after the trace. Inside the trace the graph sees the change."""
    torch.manual_seed(0)
    module, x = Net().eval(), torch.randn(2, 3)
    net = interlace.Model(module)
    before = module.head.weight.detach().clone()
    with net.trace(x):
        changed = write(net.head.weight).clone().save()  # (the weight itself is put back after the run)
    expected = write(before.clone())
    assert torch.equal(changed, expected) and not torch.equal(expected, before)  # the write happened in the run
    assert torch.equal(module.head.weight, before)  # and was put back
