"""Envoys: module methods that chain, modules attached after wrapping, module calls through hooks."""

import pytest
import torch

import interlace
from interlace import Model

from helpers import MLP, assert_clean


class SAE(torch.nn.Module):
    def __init__(self, width=8, features=16):
        super().__init__()
        self.encoder = torch.nn.Linear(width, features)
        self.decoder = torch.nn.Linear(features, width)

    def forward(self, x):
        return self.decoder(torch.relu(self.encoder(x)))


def test_module_methods_return_the_envoy_so_calls_chain(x):
    torch.manual_seed(0)
    mlp = MLP()
    net = interlace.NNsight(mlp).to("cpu").eval().float()
    assert isinstance(net, Model) and not mlp.training
    assert net.requires_grad_(False) is net and not any(p.requires_grad for p in mlp.parameters())
    assert net.train().half().bfloat16().cpu() is net and mlp.head.weight.dtype == torch.bfloat16
    assert net.layers[0].float() is net.layers[0] and mlp.layers[0].linear.weight.dtype == torch.float32
    net.float().eval()
    with net.to("cpu").trace(x):
        out = net.output.save()
    with torch.no_grad():
        assert torch.equal(out, mlp(x))


@pytest.mark.parametrize("attach", ["envoy", "module"])
def test_a_module_attached_after_wrapping_is_traceable(x, attach):
    torch.manual_seed(0)
    mlp = MLP().eval()
    net = Model(mlp)
    sae = SAE()
    if attach == "envoy":
        net.layers[1].sae = sae  # nnsight-style: set on the envoy, lands on the module
    else:
        mlp.layers[1].sae = sae
    assert mlp.layers[1].sae is sae
    with net.trace(x):
        hidden = net.layers[1].output
        reconstruction = net.layers[1].sae(hidden, hook=True).save()
        features = net.layers[1].sae.encoder.output.save()
        net.layers[1].sae.encoder.output[:, :4] = 0  # changes this call of the SAE
    with torch.no_grad():
        h = mlp.layers[1](mlp.layers[0](mlp.embed(x)))
        encoded = sae.encoder(h)
        clipped = encoded.clone()
        clipped[:, :4] = 0
        assert torch.equal(features, clipped)  # the saved tensor is the one changed in place
        assert torch.allclose(reconstruction, sae.decoder(torch.relu(clipped)))
    assert_clean(mlp)


def test_a_module_call_without_hook_is_invisible_to_hooks(x):
    torch.manual_seed(0)
    mlp = MLP().eval()
    net = Model(mlp)
    with net.trace(x):
        projected = net.head(net.layers[0].output).save()  # not a call of head in the forward
        head_in_forward = net.head.output.save()
    with torch.no_grad():
        assert torch.equal(head_in_forward, mlp(x))
        assert torch.equal(projected, mlp.head(mlp.layers[0](mlp.embed(x))))


@pytest.mark.parametrize("read", ["sae.encoder", "sae"])
def test_reading_inside_an_attached_module_called_without_hook_names_the_call(x, read):
    mlp = MLP().eval()
    net = Model(mlp)
    net.layers[1].sae = SAE()
    with pytest.raises(interlace.OutOfOrderError) as caught:
        with net.trace(x):
            net.layers[1].sae(net.layers[1].output)  # a plain call: no hooks run
            net.layers[1].get(read).output.save()
    message = str(caught.value)
    assert f"layers.1.{read}.output was never reached: layers.1.sae was called in this trace without hook=True" in message
    assert "net.layers[1].sae(net.layers[1].output)" in message  # the line of the call
    assert "call it with hook=True" in message
    assert_clean(mlp)


def test_model_underscore_model_and_tracer_result(x):
    torch.manual_seed(0)
    mlp = MLP().eval()
    net = Model(mlp)
    assert net._model is mlp
    with net.trace(x) as tracer:
        result = tracer.result.save()
    with torch.no_grad():
        assert torch.equal(result, mlp(x))
    with pytest.raises(interlace.InterlaceError, match=r"tracer.result was read after its trace ended.*`out = tracer.result.save\(\)`"):
        tracer.result
    with pytest.raises(interlace.InterlaceError, match="backend must be a RemoteBackend .* not str"):
        net.trace(x, backend="somewhere")


def test_indexing_children_as_the_module_does(x):
    """A ModuleList's envoy indexes as the list does (negative indices, a replaced item), a Sequential's
    too; an index out of range names how many children there are."""
    mlp = MLP().eval()
    net = interlace.Model(mlp)
    assert net.layers[-1].module is mlp.layers[-1] and net.layers[1].path == "layers.1"
    mlp.layers[2] = torch.nn.Identity()
    assert net.layers[2].module is mlp.layers[2] and net.layers[-2].module is mlp.layers[2]
    seq = interlace.Model(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU()))
    assert isinstance(seq[-1].module, torch.nn.ReLU) and seq[0].path == "0"
    with pytest.raises(interlace.ModulePathError, match="has 4 children; index 4 is out of range"):
        net.layers[4]
    with pytest.raises(interlace.ModulePathError, match=r"has 4 children; index -5 is out of range \(use 0 to 3, or -4 to -1 from the end\)"):
        net.layers[-5]
    assert [envoy.path for envoy in net.layers[1:3]] == ["layers.1", "layers.2"]  # a slice: a list of envoys
    with net.trace(x):
        outputs = [layer.output.save() for layer in net.layers[::2]]
    seen = []
    handle = mlp.layers[2].register_forward_hook(lambda module, args, output: seen.append(output.detach()))
    with torch.no_grad():
        mlp(x)
    handle.remove()
    assert len(outputs) == 2 and torch.equal(outputs[1], seen[0])
    with pytest.raises(interlace.ModulePathError, match="an int, a slice or a path string, not float"):
        net.layers[1.0]
    mlp.layers = torch.nn.ModuleList([torch.nn.Linear(3, 3)])  # a child replaced by name: the envoy follows
    assert net.layers.module is mlp.layers and net.layers[0].module is mlp.layers[0] and len(net.layers) == 1


def test_a_child_read_once_follows_every_later_change_of_the_module(x):
    """`net.head` is kept by its envoy after the first read (no __getattr__ call the next time); a child set
    on the torch module, through the envoy, to None, or detached through the envoy is what the next read
    sees, in every envoy of the module (a copy from model.edit() keeps its own), and a trace reaches it."""
    mlp = MLP().eval()
    net = Model(mlp)
    first = net.head
    assert net.head is first and vars(net)["head"] is first  # kept: found without a call
    with net.edit() as edited:
        pass
    assert edited.head is not first and edited.head.module is mlp.head
    wider = torch.nn.Linear(8, 7)
    mlp.head = wider  # on the torch module: both envoys of it follow
    assert net.head.module is wider and edited.head.module is wider and net.head is not first
    seen = []
    handle = wider.register_forward_hook(lambda module, args, output: seen.append(output.detach()))
    with torch.no_grad():
        mlp(x)
    handle.remove()
    with net.trace(x):
        out = net.head.output.save()
    assert out.shape == (2, 7) and torch.equal(out, seen[0])
    net.head = torch.nn.Linear(8, 2)  # through the envoy
    assert net.head.module is mlp.head and mlp.head.out_features == 2
    layer = net.layers[1]
    assert layer.linear.module is mlp.layers[1].linear
    mlp.layers[1] = torch.nn.Identity()  # a ModuleList item: its envoy is a new one, with no `linear`
    with pytest.raises(interlace.ModulePathError, match="no submodule or attribute 'linear'"):
        net.layers[1].linear
    assert layer.at_call(0).linear.module is layer.module.linear  # a view of an envoy looks its children up
    net.sae = SAE()
    assert net.sae.encoder.module is mlp.sae.encoder
    del net.sae
    with pytest.raises(interlace.ModulePathError, match="no submodule or attribute 'sae'"):
        net.sae
    mlp.head = None
    assert net.head is None
    net.note = "mine"  # an attribute set on the envoy by hand is not one it keeps: a child of that name leaves it
    mlp.note = torch.nn.ReLU()
    assert net.note == "mine"


def test_a_module_attached_through_an_envoy_is_detached_through_it(x):
    """`del envoy.sae` undoes `envoy.sae = SAE()`: the wrapped module loses it and traces no longer reach it."""
    mlp = MLP().eval()
    net = Model(mlp)
    net.layers[1].sae = SAE()
    del net.layers[1].sae
    assert not hasattr(mlp.layers[1], "sae")
    with pytest.raises(interlace.ModulePathError, match="no submodule or attribute 'sae'"):
        net.layers[1].sae
    with net.trace(x):
        out = net.output.save()
    with torch.no_grad():
        assert torch.equal(out, mlp(x))


def test_a_misspelt_envoy_attribute_suggests_the_attribute():
    """`.outputs` is a typo of the envoy's own `.output`, not of a submodule: the error names it."""
    net = interlace.Model(MLP().eval())
    with pytest.raises(interlace.ModulePathError, match="closest to 'outputs': output"):
        net.layers[0].outputs
    with pytest.raises(interlace.ModulePathError, match="closest to 'linaer': linear"):
        net.layers[0].linaer


@pytest.mark.parametrize("verb, block", [("all", r"with tracer.all\(\):"), ("iter", r"with tracer.iter\[a:b\]:")])
def test_nnsight_04s_per_module_step_verbs_point_to_the_tracers_blocks(verb, block):
    net = interlace.Model(MLP().eval())
    with pytest.raises(interlace.ModulePathError, match=f"no submodule or attribute '{verb}'.* `{block}` block"):
        getattr(net.layers[0], verb)()
