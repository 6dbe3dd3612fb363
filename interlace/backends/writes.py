"""Which tensors a call writes, decided from torch's own operator schemas, and the weights' version counters.

Every operation torch runs goes through its dispatcher as an aten operator whose schema marks the
arguments it writes (`Tensor(a!) self`, `Tensor(a!) out`). `WriteCheck` is a dispatch mode an
untrusted run holds around each call it makes: before any aten operator runs, the tensors bound to
its written arguments are looked up by storage, and a write into a weight's storage (a parameter, a
buffer, a view of one, `.data`) or into an `out` argument the graph passed in is refused before it
happens. So it does not matter how a Python-level function reaches the write (`F.relu(w, True)`,
`torch.norm(x, "fro", None, False, w)`, `F.embedding(ids, w, max_norm=1e-3)`): the operator that
would write says so, and no name of a function is involved.

`Versions` is the second line: torch bumps a tensor's version counter on every in-place write, so
the counters of every parameter and buffer are read once per run and compared after each call that
received a weight's storage and after the run. A bump fails the run (`WeightsChangedError`).

>>> w = torch.ones(2)
>>> with WriteCheck({w.untyped_storage().data_ptr()}, "F.relu"):  # doctest: +ELLIPSIS
...     torch.nn.functional.relu(w, True)
Traceback (most recent call last):
...
interlace.errors.RefusedError: F.relu (through aten.relu_.default, which writes its argument 'self') would change a weight ...
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import RefusedError


def refuse_weight_write(what: str) -> RefusedError:
    return RefusedError(
        f"{what} would change a weight of the shared model (a parameter or buffer, or a view of "
        "one). Weights are read-only here: compute on a copy, e.g. `w = weight.clone()`."
    )


class WriteCheck(TorchDispatchMode):
    """Refuses, before it runs, any aten operator whose schema writes a weight's storage or an out argument.

    weights: data pointers of the weights' storages. `passed`: storages of the tensors the graph
    handed to the call; an `out` argument among them is refused like the `out=` keyword.
    """

    def __init__(self, weights, what: str, passed=frozenset()):
        super().__init__()
        self.weights, self.what, self.passed = weights, what, passed

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for position, argument in enumerate(func._schema.arguments):
            info = argument.alias_info
            if info is None or not info.is_write:
                continue
            value = args[position] if position < len(args) else kwargs.get(argument.name)
            for tensor in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(tensor, torch.Tensor):
                    self._check(tensor, argument, func)
        return func(*args, **kwargs)

    def _check(self, tensor: torch.Tensor, argument, func) -> None:
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in self.weights:
            raise refuse_weight_write(f"{self.what} (through {func}, which writes its argument {argument.name!r})")
        if argument.is_out and pointer in self.passed:
            raise RefusedError(f"{self.what} would write its result into a tensor it was given (argument "
                               f"{argument.name!r} of {func}); `out` arguments are not allowed here: use the "
                               "returned value")


def storages_of(value, found: set | None = None) -> set:
    """Data pointers of the storages of every tensor in `value` (tuples, lists, dicts)."""
    found = set() if found is None else found
    if isinstance(value, torch.Tensor):
        if value.device.type != "meta":
            found.add(value.untyped_storage().data_ptr())
    elif isinstance(value, (list, tuple)):
        for item in value:
            storages_of(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            storages_of(item, found)
    return found


class Versions:
    """The version counters of every parameter and buffer of `root`, read once.

    >>> net = torch.nn.Linear(2, 2)
    >>> versions = Versions(net)
    >>> with torch.no_grad():
    ...     _ = net.bias.add_(1)
    >>> versions.changed()
    ['bias']
    """

    def __init__(self, root: torch.nn.Module):
        self.tensors = [(name, tensor, tensor._version) for name, tensor in _weights(root)]

    def changed(self) -> list[str]:
        return [name for name, tensor, version in self.tensors if tensor._version != version]


def _weights(root: torch.nn.Module):
    seen = set()
    for prefix, module in root.named_modules(remove_duplicate=False):
        for table in (module._parameters, module._buffers):
            for key, tensor in table.items():
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    yield f"{prefix}.{key}".lstrip("."), tensor
