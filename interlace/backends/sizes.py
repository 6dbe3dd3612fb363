"""Size rules: an upper bound on the elements a call's result holds, from its arguments' shapes.

Every allowed operation names one of these rules (`ops`); `Guard` checks the bound against `Limits`
before the call allocates anything. A rule is exact for the common case and an upper bound within
a small constant factor otherwise (a sort returns values and indices). Sizes are read from every
argument that can carry one: ints, 0-d tensors, sequences of them. Shapes not worth a formula are
worked out on the meta device (no memory, only shapes), counting every intermediate the call makes
(an einsum's pairwise products); module calls are rehearsed there the same way. A rule returns the
elements, or (elements, floating point operations) where the work grows faster than the result (a
matrix product), so that `Guard` can hold the work to the run's deadline.
"""

from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ..errors import LimitError, RefusedError
from .writes import written_tensors


def elements(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, (list, tuple)):
        return sum(elements(item) for item in value)
    if isinstance(value, dict):
        return sum(elements(item) for item in value.values())
    return 0


def _tensors(args, kwargs):
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif type(value) in (list, tuple):
            yield from (item for item in value if isinstance(item, torch.Tensor))


def _same(args, kwargs, limits, fn):
    return max((t.numel() for t in _tensors(args, kwargs)), default=1)


def broadcast_elements(shapes) -> int | None:
    """The elements of the shapes broadcast together, or None if they do not broadcast. (Worked out
    here: torch.broadcast_shapes goes through torch's Python references, ~20 µs a call, and its first
    call imports sympy, seconds.)"""
    result = [1] * max((len(shape) for shape in shapes), default=0)
    for shape in shapes:
        for place, size in enumerate(shape, len(result) - len(shape)):
            if size != 1 and result[place] != size:
                if result[place] != 1:
                    return None
                result[place] = size
    return math.prod(result)


def _broadcast(args, kwargs, limits, fn):
    size = broadcast_elements([t.shape for t in _tensors(args, kwargs)])
    return _same(args, kwargs, limits, fn) if size is None else size  # (None: the call itself fails)


def _nonzero(args, kwargs, limits, fn):
    return args[0].numel() * max(args[0].dim(), 1)


def _concatenate(args, kwargs, limits, fn):
    return sum(t.numel() for t in _tensors(args, kwargs))


def _product(args, kwargs, limits, fn):
    return math.prod(t.numel() for t in _tensors(args, kwargs))


def _int(value) -> int:
    """A size given as an int or as a 0-d integer tensor (what `x.shape[0]` and `t.sum()` give)."""
    if isinstance(value, torch.Tensor):
        if value.dim() or value.is_floating_point() or value.is_complex():
            raise ValueError(f"a size must be an int or a 0-d integer tensor, not a tensor of shape {tuple(value.shape)}")
        return int(value)
    return int(value)


def _is_size(value) -> bool:
    return type(value) is int or isinstance(value, torch.Tensor) and not value.dim() and not value.is_floating_point()


def _dim(args, kwargs, position: int) -> int:
    dim = args[position] if len(args) > position else kwargs.get("dim", 0)
    return _int(dim)


_PIECE_KEYWORDS = ("chunks", "split_size_or_sections", "split_size", "indices_or_sections",
                   "tensor_indices_or_sections", "sections", "indices")


def _pieces(args, kwargs, limits, fn):
    """chunk, split, tensor_split, unbind: the number of tensors is bounded before they are made."""
    name, tensor = fn.__name__, args[0]
    try:
        if name == "unbind":
            count = tensor.shape[_dim(args, kwargs, 1)] if tensor.dim() else 0
        else:
            how = args[1] if len(args) > 1 else next(kwargs[k] for k in _PIECE_KEYWORDS if k in kwargs)
            if isinstance(how, (list, tuple)):
                count = len(how) + (name == "tensor_split")
            elif isinstance(how, torch.Tensor) and how.dim():
                count = how.numel() + 1
            elif name == "split":
                count = -(-tensor.shape[_dim(args, kwargs, 2)] // max(_int(how), 1))
            else:
                count = _int(how)
    except Exception as error:
        raise RefusedError(f"cannot tell how many tensors {name} makes from these arguments ({error})") from None
    if count > limits.max_pieces:
        raise LimitError(f"{name} would make {count} tensors, over the limit of {limits.max_pieces} (max_pieces)")
    return tensor.numel()


def _matmul(args, kwargs, limits, fn):
    tensors = list(_tensors(args, kwargs))
    a, b = tensors[-2], tensors[-1]
    others = max((t.numel() for t in tensors[:-2]), default=0)
    if not a.dim() or not b.dim():
        return max(a.numel(), b.numel(), others)
    left = [1] + list(a.shape) if a.dim() == 1 else list(a.shape)
    right = list(b.shape) + [1] if b.dim() == 1 else list(b.shape)
    batch = broadcast_elements([left[:-2], right[:-2]])
    if batch is None:  # batch shapes that do not broadcast: the call itself fails
        return max(a.numel(), b.numel(), others)
    return max(batch * left[-2] * right[-1], others), 2 * batch * left[-2] * left[-1] * right[-1]


def _index_select(args, kwargs, limits, fn):
    tensor, index = args[0], args[2] if len(args) > 2 else kwargs["index"]
    dim = _dim(args, kwargs, 1)
    return tensor.numel() // max(tensor.shape[dim], 1) * index.numel()


def _sizes(values) -> list[int]:
    """(2, 3) or ((2, 3),) or (torch.Size([2, 3]),) -> [2, 3]."""
    if len(values) == 1 and isinstance(values[0], (list, tuple)):
        values = values[0]
    sizes = [_int(v) for v in values]
    if any(s < -1 for s in sizes):
        raise ValueError("negative size")
    return sizes


def _repeat(args, kwargs, limits, fn):
    sizes = args[1:] or (kwargs.get("dims", kwargs.get("repeats")),)
    return args[0].numel() * math.prod(max(s, 0) for s in _sizes(sizes))


def _expand(args, kwargs, limits, fn):
    tensor = args[0]
    sizes = _sizes(args[1:] or (kwargs.get("size"),))
    shape = [1] * (len(sizes) - tensor.dim()) + list(tensor.shape)
    return math.prod(old if new == -1 else new for old, new in zip(shape, sizes))


def _repeat_interleave(args, kwargs, limits, fn):
    tensor = args[0]
    repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
    if repeats is None:  # repeat_interleave(repeats): each index i repeated repeats[i] times
        return tensor.numel() * int(tensor.max()) if tensor.numel() else 0
    most = int(repeats.max()) if isinstance(repeats, torch.Tensor) and repeats.dim() else _int(repeats)
    return tensor.numel() * max(most, 0)


def _size(args, kwargs, limits, fn):
    values = (kwargs["size"],) if "size" in kwargs else args
    if values and isinstance(values[0], (list, tuple)):
        values = (values[0],)
    else:
        values = tuple(v for v in values if _is_size(v))
    return math.prod(max(s, 0) for s in _sizes(values))


def _new_size(args, kwargs, limits, fn):
    return _size(args[1:], kwargs, limits, fn)


def _range(args, kwargs, limits, fn):
    if fn.__name__ in ("linspace", "logspace"):
        return _int(args[2] if len(args) > 2 else kwargs["steps"])
    numbers = [float(v) for v in args if isinstance(v, (int, float, torch.Tensor))]
    start, end, step = 0.0, None, 1.0
    if len(numbers) == 1:
        end = numbers[0]
    elif numbers:
        start, end = numbers[0], numbers[1]
        step = numbers[2] if len(numbers) > 2 else step
    start, end, step = (float(kwargs.get(k, v)) for k, v in (("start", start), ("end", end), ("step", step)))
    return max(math.ceil((end - start) / step), 0) if step else 0


def _eye(args, kwargs, limits, fn):
    rows = _int(args[0] if args else kwargs["n"])
    columns = _int(args[1] if len(args) > 1 and _is_size(args[1]) else kwargs.get("m", rows))
    return max(rows, 0) * max(columns, 0)


def _data(args, kwargs, limits, fn, position: int = 0):
    data = args[position] if len(args) > position else kwargs.get("data")
    if isinstance(data, torch.Tensor):
        return data.numel()
    count, stack = 0, [data]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(item)
        else:
            count += item.numel() if isinstance(item, torch.Tensor) else 1
    return count


def _new_data(args, kwargs, limits, fn):
    return _data(args, kwargs, limits, fn, 1)


def _linear(args, kwargs, limits, fn):
    x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 1
    outputs = weight.shape[0] if weight.dim() == 2 else 1
    return rows * outputs, 2 * rows * outputs * weight.shape[-1] if weight.dim() else rows


def _embedding(args, kwargs, limits, fn):
    index, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
    return index.numel() * (weight.shape[-1] if weight.dim() else 1)


# What a Python object costs, in float32 elements of the same bytes: a number in a list (~32 bytes),
# a 0-d tensor (~400 bytes with its storage), a reference in a list (8 bytes).
PYTHON_NUMBER, PYTHON_TENSOR, PYTHON_REFERENCE = 8, 100, 2


def _tolist(args, kwargs, limits, fn):
    count = args[0].numel()
    if count > limits.max_list_length:
        raise LimitError(f"tolist() would make {count} Python numbers, over the limit of "
                         f"{limits.max_list_length} (max_list_length)")
    return count * PYTHON_NUMBER


def _to_meta(value):
    """`value` with every tensor (in tuples, lists and dicts) replaced by a meta tensor of its shape."""
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if type(value) in (list, tuple):
        return type(value)(_to_meta(item) for item in value)
    if type(value) is dict:
        return {key: _to_meta(item) for key, item in value.items()}
    return value


def _meta(args, kwargs, limits, fn):
    """Run the call on the meta device (shapes only, nothing allocated), counting every intermediate."""
    kwargs = {key: "meta" if key == "device" else _to_meta(value) for key, value in kwargs.items()}
    counter, flops = _ElementCounter(), FlopCounterMode(display=False)
    with torch.device("meta"), flops, counter:
        output = elements(fn(*_to_meta(tuple(args)), **kwargs))
    return max(output, counter.largest), flops.get_total_flops()


class _ElementCounter(TorchDispatchMode):
    """Counts the elements every operation returns (and the largest), while a call runs on meta."""

    def __init__(self):
        super().__init__()
        self.elements = self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        made = elements(result)
        self.elements += made
        self.largest = max(self.largest, made)
        return result


class _Rehearsal(_ElementCounter):
    """Also notes whether an operator's schema declares a write to a tensor the call did not make: one of
    its arguments or the module's weights (an in-place operation on a view of one included)."""

    def __init__(self):
        super().__init__()
        self.made: dict[int, torch.UntypedStorage] = {}  # storages operators made, by id (kept: ids stay unique)
        self.writes_outside = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(id(tensor.untyped_storage()) not in self.made for tensor in written_tensors(func, args, kwargs)):
            self.writes_outside = True
        result = super().__torch_dispatch__(func, types, args, kwargs)
        returns = func._schema.returns
        for declared, value in zip(returns, (result,) if len(returns) == 1 else result or ()):
            if declared.alias_info is None:  # (a view or an in-place result is its argument's memory)
                for tensor in value if isinstance(value, (list, tuple)) else (value,):
                    if isinstance(tensor, torch.Tensor):
                        storage = tensor.untyped_storage()
                        self.made[id(storage)] = storage
        return result


def rehearse(module: torch.nn.Module, path: str, args, kwargs) -> tuple[int, int, int, bool]:
    """(elements of the output, elements made inside, floating point operations, whether an operator inside
    declares a write to a tensor the call did not make) of calling `module`."""
    weights = {name: tensor.to("meta") for name, tensor in
               list(module.named_parameters()) + list(module.named_buffers())}
    args, kwargs = _to_meta(tuple(args)), _to_meta(dict(kwargs))  # (made before: the call did not make them)
    counter, flops = _Rehearsal(), FlopCounterMode(display=False)
    try:
        with torch.device("meta"), flops, counter:
            output = torch.func.functional_call(module, weights, args, kwargs)
    except Exception as error:
        raise RefusedError(
            f"calling {path} on these values could not be checked ahead of running it "
            f"({type(error).__name__}: {error})"
        ) from None
    return elements(output), counter.elements, flops.get_total_flops(), counter.writes_outside


def shapes(value):
    """A hashable description of the shapes (and plain values) in call arguments."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if type(value) in (list, tuple):
        return tuple(shapes(item) for item in value)
    if type(value) is dict:
        return tuple((key, shapes(item)) for key, item in value.items())
    return repr(value)[:200]


def _one(args, kwargs, limits, fn):
    return 1


def _index(args, kwargs, limits, fn):
    """`x[key]`: slices and ints never grow; index tensors and lists give their broadcast shape."""
    obj, key = args[0], args[1]
    if not isinstance(obj, torch.Tensor):
        return 1
    key = key if isinstance(key, tuple) else (key,)
    shapes, consumed = [], 0
    for item in key:
        if isinstance(item, torch.Tensor) and item.dtype == torch.bool:
            shapes.append((item.numel(),))
            consumed += item.dim()
        elif isinstance(item, (torch.Tensor, list)):
            shapes.append(tuple(torch.as_tensor(item).shape) if isinstance(item, list) else tuple(item.shape))
            consumed += 1
        elif item is not None and item is not Ellipsis:
            consumed += 1
    rest = math.prod(obj.shape[consumed:]) if consumed <= obj.dim() else 1
    indexed = broadcast_elements(shapes) if shapes else None  # None: no tensor index, or ones that do not broadcast
    kept = obj.numel() if indexed is None else rest * indexed
    return max(kept, rest)


RULES = {
    "same": _same, "broadcast": _broadcast, "nonzero": _nonzero, "concatenate": _concatenate,
    "pieces": _pieces, "matmul": _matmul, "product": _product, "index_select": _index_select,
    "repeat": _repeat, "expand": _expand, "repeat_interleave": _repeat_interleave, "size": _size,
    "new_size": _new_size, "range": _range, "eye": _eye, "data": _data, "new_data": _new_data,
    "linear": _linear, "embedding": _embedding, "tolist": _tolist, "meta": _meta, "index": _index,
    "scalar": _one, "attribute": _one, "container": _one,
}
