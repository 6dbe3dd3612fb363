"""What one run on fake tensors shows about a model: each standardized module's input and output.

Loading a `StandardizedTransformer` runs the model once under `FakeTensorMode` (shapes and dtypes
only: no compute, no weights needed, so it works on the meta device too) with hooks on the modules
the standardized names point at. From that run the accessors learn which modules return tuples,
and the load-time check compares every shape with the documented one.
"""

from __future__ import annotations

import torch

from ...backends.rows import first_input
from ...backends.scan import batched_experts, quiet
from ...errors import InterlaceError


class StandardizationError(InterlaceError, ValueError):
    """The model does not fit the standardized interface (unknown layout, wrong shapes, no such part),
    or a standardized method got a bad argument; a ValueError too, as nnterp raises there."""


def observe(module: torch.nn.Module, paths: list[str], *, batch: int = 2, length: int = 3) -> dict:
    """`{path: (first input, output)}` of each module in `paths` that ran, for `batch` x `length` tokens.

    Runs on fake tensors; when that is impossible (an operation without a fake implementation) and
    the weights are real, runs the real model on that tiny input instead.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    seen: dict = {}
    handles = []

    def record(path):
        def hook(mod, args, kwargs, output):
            if path not in seen:
                seen[path] = (first_input(args, kwargs), output)

        return hook

    for path in paths:
        target = module.get_submodule(path)
        handles.append(target.register_forward_hook(record(path), with_kwargs=True))
    ids = torch.ones(batch, length, dtype=torch.long, device=device)
    try:
        with batched_experts(module), torch.no_grad():
            try:
                mode = FakeTensorMode(allow_non_fake_inputs=True)
                with mode, quiet("torch._subclasses.fake_tensor"):
                    module(input_ids=mode.from_tensor(ids), attention_mask=mode.from_tensor(torch.ones_like(ids)))
            except Exception as error:
                if device.type == "meta":
                    raise StandardizationError(
                        f"could not run {type(module).__name__} on fake tensors to check its layout "
                        f"({type(error).__name__}: {error}). Load it with dispatch=True so the check "
                        "can run the real model on a few tokens instead."
                    ) from error
                seen.clear()
                module(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for handle in handles:
            handle.remove()
    return seen


def shape_of(value) -> tuple | None:
    """The shape of a tensor, or of the first element of a tuple output."""
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def matches(shape: tuple | None, expected: tuple) -> bool:
    """`shape` equals `expected`, where None in `expected` matches any size."""
    return shape is not None and len(shape) == len(expected) and all(
        e is None or s == e for s, e in zip(shape, expected)
    )
