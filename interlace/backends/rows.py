"""Rows: an invoke's part of a batched value, read as views and written back into a copy.

Module values are batch-first tensors, or tuples, lists, dicts and model outputs of them. `narrow`
gives an invoke its rows (views, so in-place changes reach the batch); `write_rows` builds the value
with an invoke's rows replaced; `replace_first_input` does that for a call's first input.

In a batch shared by several users' jobs (`shared=True`, see merge.py) a job must see and change
only its own rows of everything. What cannot be cut to its rows (a generation cache, a tensor
without the batch dimension, any other object) is handed out as `Shared`: a placeholder that holds
nothing of the value, so it can be neither read nor written, and that a write-back leaves as it was.
"""

from __future__ import annotations

import torch

from ..errors import RefusedError

# values that hold no rows and cannot be changed in place: handed out as they are
_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)


class SharedValueError(RefusedError):
    """A job in a batch shared with other users' jobs used a value it cannot have alone (run it alone)."""


class Shared:
    """Stands for a value every job of a shared batch holds together (`what` says which); it holds none of it.

    >>> Shared("a DynamicCache")
    <shared: a DynamicCache>
    """

    __slots__ = ("what",)

    def __init__(self, what: str):
        self.what = what

    def __repr__(self) -> str:
        return f"<shared: {self.what}>"

    def refuse(self, doing: str) -> SharedValueError:
        return SharedValueError(
            f"{doing} uses {self.what}, which every job in this batch shares and which cannot be cut to this "
            "job's rows; the job runs again alone, where the whole value is its own"
        )


def narrow(value, rows, batch_size, *, shared: bool = False, cuts: dict | None = None, batched=None, at=()):
    """The invoke's rows of every batch-first tensor in `value` (views, so writes go through).

    shared: anything else but plain values becomes a `Shared` placeholder.
    cuts: where to note each cut, `id(part) -> (part, whole tensor, rows)`.
    batched: in a shared batch, the places in the value that hold rows (see layout.py: a first dimension of
    the batch's size may be something else); a place is its index path, `at` the place of `value` itself.
    None: every tensor whose first dimension has the batch's size.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() and value.shape[0] == batch_size:
            if shared and batched is not None and at not in batched:
                return Shared(f"a tensor of shape {tuple(value.shape)} whose first dimension is not the batch")
            if shared and not _rows_apart(value):
                return Shared(f"a tensor of shape {tuple(value.shape)} whose rows share memory")
            part = value[rows[0] : rows[1]]
            if cuts is not None:
                cuts[id(part)] = (part, value, rows)
            return part
        return Shared(f"a tensor of shape {tuple(value.shape)} without the batch dimension") if shared else value
    if isinstance(value, (tuple, list)):
        items = [narrow(item, rows, batch_size, shared=shared, cuts=cuts, batched=batched, at=(*at, i))
                 for i, item in enumerate(value)]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return type(value)(**{k: narrow(v, rows, batch_size, shared=shared, cuts=cuts, batched=batched, at=(*at, k))
                              for k, v in value.items()})
    if shared and not isinstance(value, _PLAIN):
        return Shared(f"a {type(value).__name__}")
    return value


def _rows_apart(tensor: torch.Tensor) -> bool:
    """Whether no two rows of `tensor` share memory, so a write to some rows changes only those: each row spans
    less memory than the step from one row to the next. An expanded batch dimension (stride 0: every row is
    the same memory, as `position_ids.expand(batch, -1)`) or an overlapping view fails this; so may a layout
    whose rows are interleaved (a sequence-first tensor seen batch-first), which is then shared too: safe."""
    if tensor.shape[0] <= 1 or not tensor.numel():
        return True
    if tensor.layout is not torch.strided:
        return False
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape[1:], tensor.stride()[1:]))
    return abs(tensor.stride(0)) >= span


def write_rows(dest, new, rows, batch_size=None, *, shared: bool = False, batched=None, at=()):
    """A copy of `dest` whose rows `rows` of batch-first tensors hold `new`.

    shared: `dest` is a shared batch's value; anything but its batch-first tensors (those at the places in
    `batched`, as in `narrow`) stays as it is (where `new` holds a `Shared` placeholder or the same plain
    value), and replacing it is refused.
    """
    if isinstance(new, Shared) and shared:
        return dest
    if isinstance(dest, torch.Tensor) and (not shared or dest.dim() and dest.shape[0] == batch_size
                                           and (batched is None or at in batched)):
        dest = dest.clone()
        dest[rows[0] : rows[1]] = new
        return dest
    if isinstance(dest, (tuple, list)) and isinstance(new, (tuple, list)) and (not shared or len(dest) == len(new)):
        items = [write_rows(d, n, rows, batch_size, shared=shared, batched=batched, at=(*at, i))
                 for i, (d, n) in enumerate(zip(dest, new))]
        return type(dest)(*items) if hasattr(dest, "_fields") else type(dest)(items)
    if isinstance(dest, dict) and isinstance(new, dict) and (not shared or dest.keys() == new.keys()):
        return type(dest)(**{k: write_rows(v, new[k], rows, batch_size, shared=shared, batched=batched, at=(*at, k))
                             for k, v in dest.items()})
    if shared and not (isinstance(dest, _PLAIN) and type(new) is type(dest) and new == dest):
        what = f"a tensor of shape {tuple(dest.shape)}" if isinstance(dest, torch.Tensor) else f"a {type(dest).__name__}"
        raise Shared(what).refuse("replacing it")
    return new


def first_input(args, kwargs):
    """A call's first input: its first positional argument, else its first keyword argument."""
    return args[0] if args else next(iter(kwargs.values()), None)


def first_input_place(args, kwargs) -> tuple:
    """The place (index path, as in `narrow`) of a call's first input in its `(args, kwargs)`."""
    return (0, 0) if args else (1, next(iter(kwargs), None))


def replace_first_input(value, new, rows, batch_size=None, *, shared: bool = False, batched=None):
    """(args, kwargs) of a call with its first input replaced (only `rows` of it, when given)."""
    args, kwargs = value
    if rows is not None:
        new = write_rows(first_input(args, kwargs), new, rows, batch_size, shared=shared, batched=batched,
                         at=first_input_place(args, kwargs))
    if args:
        return ((new,) + tuple(args[1:]), kwargs)
    first = next(iter(kwargs))
    return (args, {**kwargs, first: new})


def contains_shared(value) -> bool:
    """Whether a `Shared` placeholder is anywhere in `value` (tuples, lists, dicts, however deep)."""
    stack, seen = [value], set()
    while stack:
        item = stack.pop()
        if isinstance(item, Shared):
            return True
        if isinstance(item, (tuple, list, dict)) and id(item) not in seen:
            seen.add(id(item))
            stack.extend(item.values() if isinstance(item, dict) else item)
    return False
