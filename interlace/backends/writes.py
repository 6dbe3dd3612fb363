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
received a weight's storage and after the run. A bump means an operator wrote a weight without its
schema saying so (rare): nothing was copied to undo it, so the run fails (`WeightsChangedError`) and
the model must be loaded again before it runs another job. A buffer written with the values it held is
not a change: a LongRoPE forward copies its frequencies back into its `inv_freq` on every call, so each
buffer's values are kept (a copy per model, taken again only when its counter moved between runs) and
compared when its counter moves.

>>> w = torch.ones(2)
>>> with WriteCheck({w.untyped_storage().data_ptr(): w.untyped_storage()}, "F.relu"):  # doctest: +ELLIPSIS
...     torch.nn.functional.relu(w, True)
Traceback (most recent call last):
...
interlace.errors.RefusedError: F.relu (through aten.relu_.default, which writes its argument 'self') would change a weight ...
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import RefusedError
from .tree import ModelTree


def refuse_weight_write(what: str) -> RefusedError:
    error = RefusedError(
        f"{what} would change a weight of the shared model (a parameter or buffer, or a view of "
        "one). Weights are read-only here: compute on a copy, e.g. `w = weight.clone()`."
    )
    error.hint = "every job shares the hosted weights: change module outputs, or compute on a copy of a weight"
    return error


def warm_up() -> None:
    """Run an operator under the write check once: torch imports its compiler (and sympy) the first time
    a dispatch mode sees one, ~4 s, which a server pays when it starts, not in its first request."""
    with WriteCheck({}, "warming up"):
        torch.zeros(1).add_(1)


class WriteCheck(TorchDispatchMode):
    """Refuses, before it runs, any aten operator whose schema writes a weight's storage, or writes an
    `out` argument the call did not make itself (a tensor it was handed: like the `out=` keyword).

    weights: data pointer -> storage (or a tensor) of every weight. After the call, `touched` holds the
    data pointers of the weights' storages operators saw (their version counters are worth comparing,
    see `Versions`), and `declared_write` whether any operator declared a write at all. keep: in a local
    run, what is handed a weight's storage before an operator writes it (to copy and put back after the
    run), where an untrusted run refuses; `out` arguments are then the caller's to give.
    """

    def __init__(self, weights, what: str, keep=None):
        super().__init__()
        self.weights, self.what, self.keep = weights, what, keep
        self.made: set[int] = set()  # storages of the tensors operators made during the call
        self.touched: set[int] = set()
        self.declared_write = False  # whether an operator's schema declared a write to any of its arguments

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for argument in _tensor_arguments(func):
            if argument.written:
                self.declared_write = True
            value = args[argument.position] if argument.position < len(args) else kwargs.get(argument.name)
            for tensor in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(tensor, torch.Tensor):
                    self._check(tensor, argument, func)
        result = func(*args, **kwargs)
        for tensor in result if isinstance(result, (list, tuple)) else (result,):
            if isinstance(tensor, torch.Tensor):
                self.made.add(tensor.untyped_storage().data_ptr())
        return result

    def _check(self, tensor: torch.Tensor, argument: "_Argument", func) -> None:
        pointer = tensor.untyped_storage().data_ptr()
        written = argument.written
        if pointer in self.weights:
            if written:
                if self.keep is None:
                    raise refuse_weight_write(f"{self.what} (through {func}, which writes its argument {argument.name!r})")
                self.keep(tensor.untyped_storage())
            self.touched.add(pointer)
        elif written and argument.is_out and pointer not in self.made and self.keep is None:
            raise RefusedError(f"{self.what} would write its result into a tensor it was given (argument "
                               f"{argument.name!r} of {func}); `out` arguments are not allowed here: use the "
                               "returned value")


_MOST_COPIED = 1 << 24  # bytes: a larger buffer is not kept to compare (a write to it fails the run)
_ARGUMENTS: dict = {}  # operator -> its arguments that can hold tensors


class _Argument(NamedTuple):
    """What an operator's schema says of one of its arguments that can hold tensors, read once per operator (each
    read of the schema's objects makes new Python objects)."""

    position: int
    name: str
    written: bool  # `Tensor(a!)`: the operator writes it
    is_out: bool  # an `out` argument


def written_tensors(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors bound to the arguments operator `func`'s schema declares it writes (`Tensor(a!)`)."""
    written = []
    for argument in _tensor_arguments(func):
        if argument.written:
            value = args[argument.position] if argument.position < len(args) else kwargs.get(argument.name)
            written += [tensor for tensor in (value if isinstance(value, (list, tuple)) else (value,))
                        if isinstance(tensor, torch.Tensor)]
    return written


def _tensor_arguments(func) -> list[_Argument]:
    arguments = _ARGUMENTS.get(func)
    if arguments is None:
        arguments = _ARGUMENTS[func] = [
            _Argument(position, argument.name, argument.alias_info is not None and argument.alias_info.is_write,
                      argument.is_out)
            for position, argument in enumerate(func._schema.arguments) if "Tensor" in str(argument.type)]
    return arguments


class Versions:
    """The version counters of every parameter and buffer of `root`, read once.

    >>> net = torch.nn.Linear(2, 2)
    >>> versions = Versions(net)
    >>> with torch.no_grad():
    ...     _ = net.bias.add_(1)
    >>> versions.changed()
    ['bias']
    >>> versions.changed({net.weight.untyped_storage().data_ptr()})  # only the weights in these storages
    []
    """

    def __init__(self, root: torch.nn.Module):
        tree = self.tree = ModelTree.of(root)
        if tree.versions is not None:  # (a held model, as the last run left it: see tree.py)
            self.versions = list(tree.versions)
            return
        versions = self.versions = [tensor._version for tensor in tree.weight_tensors]
        for number in tree.buffers:  # (a few small tensors: rotary frequencies, masks)
            tensor, kept = tree.weight_tensors[number], tree.buffer_copies.get(number)
            if (kept is None or kept[0] != versions[number]) and tensor.device.type != "meta" \
                    and tensor.nbytes <= _MOST_COPIED:
                tree.buffer_copies[number] = (versions[number], tensor.detach().clone())

    def changed(self, storages=None) -> list[str]:
        """The weights whose counters moved: all, or those whose storage is in `storages` (data pointers). A held
        model's tree keeps the counters of a check of all that found none moved (see tree.py)."""
        tree, versions = self.tree, self.versions
        if storages is None:
            now = [tensor._version for tensor in tree.weight_tensors]
            numbers = () if now == versions else range(len(now))  # (compared in one C call: the common case)
        else:  # (a call's few storages: a loop, not generators, each a frame made on cold caches)
            numbers, by_storage = [], tree.by_storage
            for pointer in storages:
                numbers += by_storage.get(pointer, ())
            numbers.sort()
        tensors, changed = tree.weight_tensors, []
        for n in numbers:
            if tensors[n]._version != versions[n] and not self._same_values(n):
                changed.append(tree.weights[n][0])
        if storages is None and not changed and tree.held:  # (then `versions` holds what `now` does)
            tree.versions = now
        return changed

    def _same_values(self, number: int) -> bool:
        """Whether weight `number` is a buffer that holds the values it held at the start: then its counter counts
        from here."""
        tensor, kept = self.tree.weight_tensors[number], self.tree.buffer_copies.get(number)
        if kept is None or kept[0] != self.versions[number] or not torch.equal(tensor, kept[1]):
            return False
        self.versions[number] = tensor._version
        self.tree.buffer_copies[number] = (tensor._version, kept[1])
        return True
