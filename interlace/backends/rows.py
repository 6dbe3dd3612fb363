"""Rows: an invoke's part of a batched value, read as views and written back into a copy.

Module values are batch-first tensors, or tuples, lists, dicts and model outputs of them. `narrow`
gives an invoke its rows (views, so in-place changes reach the batch); `write_rows` builds the value
with an invoke's rows replaced; `replace_first_input` does that for a call's first input.
"""

from __future__ import annotations

import torch


def narrow(value, rows, batch_size):
    """The invoke's rows of every batch-first tensor in `value` (views, so writes go through)."""
    if isinstance(value, torch.Tensor):
        if value.dim() and value.shape[0] == batch_size:
            return value[rows[0] : rows[1]]
        return value
    if isinstance(value, (tuple, list)):
        items = [narrow(item, rows, batch_size) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return type(value)(**{k: narrow(v, rows, batch_size) for k, v in value.items()})
    return value


def write_rows(dest, new, rows):
    """A copy of `dest` whose rows `rows` of batch-first tensors hold `new`."""
    if isinstance(dest, torch.Tensor):
        dest = dest.clone()
        dest[rows[0] : rows[1]] = new
        return dest
    if isinstance(dest, (tuple, list)):
        items = [write_rows(d, n, rows) for d, n in zip(dest, new)]
        return type(dest)(*items) if hasattr(dest, "_fields") else type(dest)(items)
    if isinstance(dest, dict):
        return type(dest)(**{k: write_rows(v, new[k], rows) for k, v in dest.items()})
    return new


def first_input(args, kwargs):
    """A call's first input: its first positional argument, else its first keyword argument."""
    return args[0] if args else next(iter(kwargs.values()), None)


def replace_first_input(value, new, rows):
    """(args, kwargs) of a call with its first input replaced (only `rows` of it, when given)."""
    args, kwargs = value
    if rows is not None:
        new = write_rows(first_input(args, kwargs), new, rows)
    if args:
        return ((new,) + tuple(args[1:]), kwargs)
    first = next(iter(kwargs))
    return (args, {**kwargs, first: new})
