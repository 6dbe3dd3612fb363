"""Read-and-compute on proxies: operators, indexing, methods, torch functions, attributes."""

import collections

import torch

from interlace import Model

Pair = collections.namedtuple("Pair", "first second")


class TwoOutputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.inner(x)
        return y, y * 2


class NamedOutputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pair = TwoOutputs()

    def forward(self, x):
        a, b = self.pair(x)
        return Pair(a, b)


def test_operators_methods_and_torch_functions_match_eager():
    torch.manual_seed(0)
    model = TwoOutputs()
    net = Model(model)
    x = torch.randn(3, 4)
    with net.trace(x):
        y = net.inner.output
        results = [
            (y + 1).save(), (2 - y).save(), (y * y).save(), (y / 3).save(), (-y).save(), abs(y).save(),
            (y ** 2).save(), (y @ y.T).save(), (y > 0).save(), (y == y).save(),
            y[:, 1:3].save(), y[..., 0].save(), y[torch.tensor([0, 2])].save(),
            y.sum(dim=-1).save(), y.softmax(-1).save(), torch.relu(y).save(),
            torch.nn.functional.gelu(y).save(), torch.cat([y, y], dim=0).save(),
            y.shape.save(), y.T.save(), (torch.ones(4) + y).save(),
        ]
    with torch.no_grad():
        e = model.inner(x)
    expected = [
        e + 1, 2 - e, e * e, e / 3, -e, abs(e), e ** 2, e @ e.T, e > 0, e == e, e[:, 1:3], e[..., 0],
        e[torch.tensor([0, 2])], e.sum(dim=-1), e.softmax(-1), torch.relu(e),
        torch.nn.functional.gelu(e), torch.cat([e, e], dim=0), e.shape, e.T, torch.ones(4) + e,
    ]
    for got, want in zip(results, expected):
        if isinstance(want, torch.Tensor):
            assert torch.equal(got, want)
        else:
            assert got == want


def test_tuple_and_attribute_outputs():
    torch.manual_seed(0)
    model = NamedOutputs()
    net = Model(model)
    x = torch.randn(2, 4)
    with net.trace(x):
        second = net.pair.output[1].save()
        named = net.output.second.save()
    with torch.no_grad():
        e = model(x)
    assert torch.equal(second, e.second)
    assert torch.equal(named, e.second)


def test_proxy_slices_and_indices_from_other_proxies():
    net = Model(torch.nn.Identity())
    x = torch.arange(12.0).reshape(3, 4)
    with net.trace(x):
        out = net.output
        n = out.shape[0] - 1
        top = out[:n].save()
        argmax = out.argmax(dim=-1)
        picked = out[torch.arange(3), argmax].save()
    assert torch.equal(top, x[:2])
    assert torch.equal(picked, x[:, 3])
