"""Layout: which values of a merged forward hold the batch's rows, learnt from what the forward does.

In a batch shared by several users' jobs a job gets its rows of the values that have them (rows.py). A
first dimension of the batch's size does not make rows: a sequence-first tensor, or an expert-first one
inside a mixture-of-experts layer, may have that size by chance, and a job picks its prompt count to
make it so and reach the other jobs' values there. So the forward is run on fake tensors (shapes only,
no compute, see scan.py) twice: on the batch, and on the batch with its last row once more. A value
holds rows at a place (its index path inside the module's output or `(args, kwargs)`) only where its
first dimension grew by exactly that row in every call of the module, the rest of its shape unchanged;
everything else is `Shared`. A generation's later steps (calls the fake run of its first step does not
make) are taken to lay out each module's values as its calls there do.

A fake run cannot go through an operation whose output depends on the data (an eager mixture-of-experts
loop over the experts hit, `nonzero`): the innermost module of the model that met one runs for real, on
zeros and on ones of its inputs' shapes, and the fake run goes on with what it gave, the same shapes both
times (else its output's shape depends on the data too, and the run stops). What that module holds inside
(its submodules, its `.source` points) is then unknown: `Shared`; so is what a run that stopped did not reach.

Which places hold rows is decided by how the model lays its values out (its code), not by the sizes it is
given: a module that puts the sequence first does so for any length and batch. So a layout is kept per model
and input structure (which tensors, their dimensions, dtypes and devices, which of them are batch-first, the
other values as they are) and the `.source` points made, whatever the batch size and padded length: a
server pays the two fake runs once per kind of forward, not per shape. A value whose first dimension is
not the batch stays so at every size; a size that happens to match (the attack) finds the layout that says so.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from contextlib import contextmanager

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode, unset_fake_temporarily)

from ..source import points
from .local import _InstanceAttribute
from .scan import fake_run, map_tensors
from .state import Attachments

_DATA_DEPENDENT = (DataDependentOutputException, DynamicOutputShapeException)

_KEPT = 64  # layouts kept per model (the least recently used goes): a model has a few kinds of forward
_layouts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Layout:
    """For each `(module path, "input" | "output")`, the places in its calls' values that hold rows."""

    def __init__(self, places: dict[tuple[str, str], frozenset]):
        self.places = places

    def batched(self, path: str, kind: str) -> frozenset:
        return self.places.get((path, kind), frozenset())


def layout_of(root: torch.nn.Module, inputs, batch_size: int) -> Layout:
    """The layout of `root(*args, **kwargs)` for `inputs = (args, kwargs)`, a batch of `batch_size` rows
    (batch-first tensors: the invokes' inputs laid end to end), from the cache when it was found before."""
    made = list(points(root))  # the `.source` points made so far are hooked too
    key = (_structure(inputs, batch_size), tuple(path for path, _ in made))
    kept = _layouts.setdefault(root, OrderedDict())
    if key in kept:
        kept.move_to_end(key)
        return kept[key]
    layout = kept[key] = find_layout(root, [*root.named_modules(), *made], inputs, batch_size)
    if len(kept) > _KEPT:
        kept.popitem(last=False)
    return layout


def find_layout(root: torch.nn.Module, modules, inputs, batch_size: int) -> Layout:
    """Run the forward on fake tensors at `batch_size` rows and at one more, and compare (see the module)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    device = next((p.device for p in root.parameters()), torch.device("cpu"))
    args, kwargs = map_tensors(inputs, lambda t: mode.from_tensor(t.to(device)))
    grown = map_tensors((args, kwargs), lambda t: torch.cat([t, t[-1:]]) if t.dim() and len(t) == batch_size else t)
    seen: list[dict] = [{}, {}]
    unknown = set()
    attachments = Attachments(root)  # what a forward sets on its modules (a dynamic RoPE's cache length) goes
    try:
        for number, (run_args, run_kwargs) in enumerate(((args, kwargs), grown)):
            try:
                with _for_real_where_data_decides(root, mode, seen[number], unknown):
                    fake_run(root, modules, lambda: root(*run_args, **run_kwargs), mode, seen[number])
            except Exception as error:  # what it did not reach holds no rows
                logging.getLogger(__name__).debug("the fake run of %s stopped: %r", type(root).__name__, error)
    finally:
        attachments.restore()
    batched, shut = {}, set()
    for (path, kind, call), value in seen[0].items():
        own, other = batched.setdefault((path, kind), set()), set()
        _compare(value, seen[1].get((path, kind, call)), batch_size, (), own, other)
        shut |= {(path, kind, place) for place in other}
    places = {key: frozenset(place for place in own if (*key, place) not in shut)
              for key, own in batched.items() if key not in unknown}
    return Layout(places)


@contextmanager
def _for_real_where_data_decides(root: torch.nn.Module, mode: FakeTensorMode, seen: dict, unknown: set):
    """Each module under `root` that meets an operation a fake run cannot do runs again for real, on zeros; what
    `seen` noted while it ran goes to `unknown` as `(path, kind)`."""
    handles = []

    def wrap(module, forward):
        def run(*args, **kwargs):
            start = len(seen)
            try:
                return forward(*args, **kwargs)
            except _DATA_DEPENDENT:
                with unset_fake_temporarily():
                    outputs = []
                    for fill in (torch.zeros, torch.ones):
                        real = map_tensors((args, kwargs), lambda t: fill(t.shape, dtype=t.dtype, device=t.device))
                        outputs.append(forward(*real[0], **real[1]))
                unknown.update((path, kind) for path, kind, _ in list(seen)[start:])
                if _signature(outputs[0]) != _signature(outputs[1]):
                    raise ValueError(f"the shapes {type(module).__name__} gives depend on its inputs' values") from None
                return map_tensors(outputs[0], mode.from_tensor)
        return run

    try:
        for module in root.modules():  # (`.source` points are not among them: their module is the innermost)
            if module is not root:  # (the whole model run for real is no fake run)
                handles.append(_InstanceAttribute(module, "forward"))
                module.forward = wrap(module, module.forward)
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()


def _compare(small, big, batch_size: int, at: tuple, rows: set, other: set) -> None:
    """Note each place of `small` in `rows` where `big` is it with one more row, else in `other`."""
    if isinstance(small, torch.Tensor):
        grew = (isinstance(big, torch.Tensor) and small.dim() and big.dim() and small.shape[0] == batch_size
                and big.shape[0] == batch_size + 1 and small.shape[1:] == big.shape[1:])
        (rows if grew else other).add(at)
    elif isinstance(small, (tuple, list)):
        for i, item in enumerate(small):
            same = isinstance(big, (tuple, list)) and len(big) == len(small)
            _compare(item, big[i] if same else None, batch_size, (*at, i), rows, other)
    elif isinstance(small, dict):
        for k, item in small.items():
            _compare(item, big.get(k) if isinstance(big, dict) else None, batch_size, (*at, k), rows, other)


def _structure(value, batch_size: int):
    """What the layout depends on in the inputs: for each tensor its dimensions, dtype, device and whether it is
    batch-first, not its sizes; other values as they are."""
    return _described(value, lambda t: (t.dim(), t.dtype, t.device, t.dim() > 0 and len(t) == batch_size))


def _signature(value):
    """What a value is made of: tensors' shapes, dtypes and devices, other values as they are."""
    return _described(value, lambda t: (tuple(t.shape), t.dtype, t.device))


def _described(value, tensor):
    """`value` as comparable data: each tensor as `tensor(it)`, containers item by item, other values' repr."""
    if isinstance(value, torch.Tensor):
        return ("tensor", *tensor(value))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, *(_described(item, tensor) for item in value))
    if isinstance(value, dict):
        return ("dict", *((k, _described(v, tensor)) for k, v in value.items()))
    return repr(value)
