"""What a run may do to the shared model and to the process: writes to weights, sizes, time.

`Guard` is consulted by the interleaver before every operation it runs.

- Writes: an in-place operation whose tensor shares storage with a parameter or buffer is refused
  in an untrusted run; in a local run the storage is copied first and restored when the run ends,
  so after every trace the weights are bit for bit what they were.
- Sizes (untrusted runs): each allowed operation has a size rule (named in `ops`) that bounds the
  elements of its result from its arguments' shapes; the bound is checked against `Limits` before
  the call allocates anything. Python values (ints, strings, lists) are bounded the same way.
- Time (untrusted runs): a deadline and a cancel flag, checked between operations.

`ModelState` is a snapshot of everything about a model a run could change (parameters, buffers,
`requires_grad`, `.grad`, hooks, instance `forward`, training flags) and of torch's global state;
`restore()` puts it back and `diff()` says what changed (the tests use it on every hostile graph).
"""

from __future__ import annotations

import math
import time

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

from .. import ops
from ..errors import CancelledError, LimitError, RefusedError
from .limits import Limits

_SEQUENCES = (str, bytes, list, tuple)


class Guard:
    """Checks for one run; `untrusted` adds the budget and allow-list checks to the write checks."""

    def __init__(self, root: torch.nn.Module, *, untrusted: bool, limits: Limits | None = None,
                 cancel=None):
        self.root = root
        self.untrusted = untrusted
        self.limits = limits or Limits()
        self.cancel = cancel  # anything with is_set(), e.g. a threading.Event
        self.deadline = time.monotonic() + self.limits.max_seconds if untrusted else None
        self.created = 0  # elements created so far
        self._storages: dict[int, torch.UntypedStorage] | None = None  # data_ptr -> weight storage
        self._copies: dict[int, torch.UntypedStorage] = {}  # storages changed locally, as they were
        self._rehearsed: dict[tuple, tuple[int, int]] = {}  # module calls: (output, all) elements

    # -- writes ------------------------------------------------------------------------------------
    def before_write(self, value, what: str) -> None:
        """`value` is about to be changed in place: refuse (untrusted) or keep a copy (local)."""
        if not isinstance(value, torch.Tensor) or value.device.type == "meta" or isinstance(value, FakeTensor):
            return
        if self._storages is None:
            self._storages = weight_storages(self.root)
        storage = self._storages.get(value.untyped_storage().data_ptr())
        if storage is None:
            return
        if self.untrusted:
            raise RefusedError(
                f"{what} would change a weight of the shared model (a parameter or buffer, or a view of "
                "one). Weights are read-only here: compute on a copy, e.g. `w = weight.clone()`."
            )
        pointer = storage.data_ptr()
        if pointer not in self._copies:
            self._copies[pointer] = storage.clone()

    def restore_weights(self) -> None:
        """Put back every weight storage a local run changed."""
        with torch.no_grad():
            for pointer, copy in self._copies.items():
                self._storages[pointer].copy_(copy)
        self._copies.clear()

    # -- budgets (untrusted runs) ----------------------------------------------------------------------
    def tick(self) -> None:
        """Between operations: stop when cancelled or past the deadline."""
        if self.cancel is not None and self.cancel.is_set():
            raise CancelledError("the run was cancelled")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise LimitError(f"the run took longer than its limit of {self.limits.max_seconds:g} s (max_seconds)")

    def before_call(self, name: str, fn, args, kwargs) -> None:
        """Checks before calling function entry `name` (untrusted runs)."""
        _refuse_out_arguments(kwargs)
        if name in ops.MUTATING_TARGETS and args:
            self.before_write(args[0], name)
        if name.startswith("operator.") or name.startswith("builtins."):
            self._python_growth(name, args)
        if name == "builtins.getattr":
            _check_attribute(args)
        self._count(name, fn, ops.size_rule(name), args, kwargs)

    def before_method(self, name: str, args, kwargs) -> None:
        """Checks before calling method `name` on `args[0]` (untrusted runs)."""
        receiver = args[0] if args else None
        _refuse_out_arguments(kwargs)
        if isinstance(receiver, torch.Tensor):
            if name not in ops.TENSOR_METHODS:
                raise RefusedError(f"tensors have no allowed method {name!r}")
            if ops.is_in_place_method(name):
                self.before_write(receiver, f".{name}()")
            self._count(f"Tensor.{name}", getattr(torch.Tensor, name), ops.TENSOR_METHODS[name], args, kwargs)
            return
        kind = list if isinstance(receiver, list) else dict if isinstance(receiver, dict) else None
        if kind is None or name not in ops.CONTAINER_METHODS[kind]:
            raise RefusedError(f"method {name!r} is not allowed on a {type(receiver).__name__}")
        if name == "extend":
            self._length(len(receiver) + _length_of(args[1] if len(args) > 1 else ()))

    def before_module_call(self, module: torch.nn.Module, path: str, args, kwargs) -> None:
        """Calling a module on values: its output and everything it makes inside are bounded first.

        The call is rehearsed on the meta device (shapes only), counting the elements of every
        operation inside it; rehearsals are reused for calls with the same shapes.
        """
        key = (path, _shapes(args), _shapes(kwargs))
        counted = self._rehearsed.get(key)
        if counted is None:
            counted = self._rehearsed[key] = _rehearse(module, path, args, kwargs)
        output, inside = counted
        if output > self.limits.max_elements:
            raise LimitError(f"calling {path} would create {output} elements, over the limit of "
                             f"{self.limits.max_elements} for one value (max_elements)")
        self._add(inside)

    def check_value(self, value) -> None:
        """After an operation: Python values it made stay within the limits (untrusted runs)."""
        _check_python_value(value, self.limits)

    def check_replacement(self, old, new, what: str) -> None:
        """A swap or skip may not make the model compute on more elements than it would have."""
        before, after = _elements(old), _elements(new)
        if after > before:
            raise LimitError(
                f"{what} has {after} elements where the model's value has {before}; a replacement "
                "may not be larger than the value it replaces here"
            )

    def _count(self, name, fn, rule, args, kwargs) -> None:
        try:
            elements = _RULES[rule](args, kwargs, self.limits, fn)
        except (LimitError, RefusedError):
            raise
        except Exception:
            elements = _meta(args, kwargs, self.limits, fn)  # arguments the formula does not expect
        if elements > self.limits.max_elements:
            raise LimitError(
                f"{name} would create {elements} elements, over the limit of {self.limits.max_elements} "
                "for one value (max_elements)"
            )
        self._add(elements)

    def _add(self, elements: int) -> None:
        limits = self.limits
        self.created += elements
        if self.created > limits.max_total_elements:
            raise LimitError(
                f"the run would create more than {limits.max_total_elements} elements in all "
                "(max_total_elements); save less, or split the work into several requests"
            )

    def _python_growth(self, name: str, args) -> None:
        """Repetition, concatenation, formatting and int growth, bounded before Python computes them."""
        op = name.split(".")[-1]
        if op in ("list", "tuple", "dict") and args:
            self._length(_length_of(args[0]))
        if len(args) != 2:
            return
        a, b = args
        op = op[1:] if name in ops.MUTATING_TARGETS and op not in ("setitem", "delitem") else op
        if op == "mul":
            for seq, times in ((a, b), (b, a)):
                if isinstance(seq, _SEQUENCES) and type(times) in (int, bool):
                    self._length(len(seq) * max(times, 0))
        elif op == "add" and isinstance(a, _SEQUENCES) and isinstance(b, _SEQUENCES):
            self._length(len(a) + len(b))
        elif op == "mod" and isinstance(a, (str, bytes)):
            raise RefusedError("string formatting with % is not allowed here")
        elif op in ("pow", "lshift") and type(a) is int and type(b) is int and b > 0:
            if op == "pow" and abs(a) <= 1:
                return
            bits = a.bit_length() * b if op == "pow" else a.bit_length() + b
            if bits > self.limits.max_int_bits:
                raise LimitError(f"{name} would make an int of about {bits} bits, over the limit of "
                                 f"{self.limits.max_int_bits} (max_int_bits)")

    def _length(self, length: int) -> None:
        if length > self.limits.max_list_length:
            raise LimitError(f"a Python value would hold {length} items, over the limit of "
                             f"{self.limits.max_list_length} (max_list_length)")


def weight_storages(root: torch.nn.Module) -> dict[int, torch.UntypedStorage]:
    """data_ptr -> storage of every parameter, buffer and gradient of `root`."""
    storages = {}
    for module in root.modules():
        for table in (module._parameters, module._buffers):
            for tensor in table.values():
                if tensor is None or tensor.device.type == "meta":
                    continue
                for held in (tensor, tensor.grad):
                    if held is not None and held.numel():
                        storage = held.untyped_storage()
                        storages[storage.data_ptr()] = storage
    return storages


def _refuse_out_arguments(kwargs) -> None:
    if "out" in kwargs or kwargs.get("inplace"):
        raise RefusedError("`out=` and `inplace=True` are not allowed here: use the returned value")


def _check_attribute(args) -> None:
    """getattr in an untrusted run: data attributes of tensors, fields of model outputs."""
    if len(args) not in (2, 3) or type(args[1]) is not str:
        raise RefusedError("getattr takes an object and an attribute name")
    obj, name = args[0], args[1]
    if isinstance(obj, torch.Tensor):
        allowed = name in ops.TENSOR_ATTRIBUTES
    elif isinstance(obj, dict) and hasattr(type(obj), "__dataclass_fields__"):  # a ModelOutput
        allowed = name in type(obj).__dataclass_fields__
    else:  # torch.return_types (values, indices)
        allowed = name in getattr(type(obj), "__match_args__", ()) and isinstance(obj, tuple)
    if not allowed:
        raise RefusedError(
            f"reading attribute {name!r} of a {type(obj).__name__} is not allowed here; tensors allow "
            f"{', '.join(sorted(ops.TENSOR_ATTRIBUTES))}; model outputs allow their fields"
        )


def _length_of(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.shape[0] if value.dim() else 1
    return len(value) if isinstance(value, (_SEQUENCES, dict)) else 1


def _check_python_value(value, limits: Limits) -> None:
    """Only the value itself: what it holds was checked when it was made (or when it was loaded)."""
    kind = type(value)
    if kind is int:
        if value.bit_length() > limits.max_int_bits:
            raise LimitError(f"an int of {value.bit_length()} bits is over the limit of {limits.max_int_bits} (max_int_bits)")
    elif kind is str:
        if len(value) > limits.max_string_length:
            raise LimitError(f"a string of {len(value)} characters is over the limit of "
                             f"{limits.max_string_length} (max_string_length)")
    elif isinstance(value, (list, tuple, dict)) and not isinstance(value, torch.Size):
        if len(value) > limits.max_list_length:
            raise LimitError(f"a {kind.__name__} of {len(value)} items is over the limit of "
                             f"{limits.max_list_length} (max_list_length)")


def _elements(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, (list, tuple)):
        return sum(_elements(item) for item in value)
    if isinstance(value, dict):
        return sum(_elements(item) for item in value.values())
    return 0


# -- size rules: an upper bound on the elements of a call's result, from its arguments -----------------
def _tensors(args, kwargs):
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif type(value) in (list, tuple):
            yield from (item for item in value if isinstance(item, torch.Tensor))


def _same(args, kwargs, limits, fn):
    return max((t.numel() for t in _tensors(args, kwargs)), default=1)


def _broadcast(args, kwargs, limits, fn):
    shapes = [t.shape for t in _tensors(args, kwargs)]
    try:
        return math.prod(torch.broadcast_shapes(*shapes)) if shapes else 1
    except RuntimeError:  # shapes that do not broadcast: the call itself fails
        return _same(args, kwargs, limits, fn)


def _nonzero(args, kwargs, limits, fn):
    return args[0].numel() * max(args[0].dim(), 1)


def _concatenate(args, kwargs, limits, fn):
    return sum(t.numel() for t in _tensors(args, kwargs))


def _product(args, kwargs, limits, fn):
    return math.prod(t.numel() for t in _tensors(args, kwargs))


def _dim(args, kwargs, position: int) -> int:
    dim = args[position] if len(args) > position else kwargs.get("dim", 0)
    return int(dim)


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
                count = -(-tensor.shape[_dim(args, kwargs, 2)] // max(int(how), 1))
            else:
                count = int(how)
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
    batch = torch.broadcast_shapes(tuple(left[:-2]), tuple(right[:-2]))
    return max(math.prod(batch) * left[-2] * right[-1], others)


def _index_select(args, kwargs, limits, fn):
    tensor, index = args[0], args[2] if len(args) > 2 else kwargs["index"]
    dim = _dim(args, kwargs, 1)
    return tensor.numel() // max(tensor.shape[dim], 1) * index.numel()


def _sizes(values) -> list[int]:
    """(2, 3) or ((2, 3),) or (torch.Size([2, 3]),) -> [2, 3]."""
    if len(values) == 1 and isinstance(values[0], (list, tuple)):
        values = values[0]
    sizes = [int(v) for v in values]
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
    most = int(repeats.max()) if isinstance(repeats, torch.Tensor) and repeats.numel() else int(repeats)
    return tensor.numel() * max(most, 0)


def _size(args, kwargs, limits, fn):
    values = (kwargs["size"],) if "size" in kwargs else args
    if values and isinstance(values[0], (list, tuple)):
        values = (values[0],)
    else:
        values = tuple(v for v in values if type(v) is int)
    return math.prod(max(s, 0) for s in _sizes(values))


def _new_size(args, kwargs, limits, fn):
    return _size(args[1:], kwargs, limits, fn)


def _range(args, kwargs, limits, fn):
    if fn.__name__ in ("linspace", "logspace"):
        return int(args[2] if len(args) > 2 else kwargs["steps"])
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
    rows = int(args[0] if args else kwargs["n"])
    columns = int(args[1] if len(args) > 1 and type(args[1]) is int else kwargs.get("m", rows))
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
    return rows * (weight.shape[0] if weight.dim() == 2 else 1)


def _embedding(args, kwargs, limits, fn):
    index, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
    return index.numel() * (weight.shape[-1] if weight.dim() else 1)


def _tolist(args, kwargs, limits, fn):
    count = args[0].numel()
    if count > limits.max_list_length:
        raise LimitError(f"tolist() would make {count} Python numbers, over the limit of "
                         f"{limits.max_list_length} (max_list_length)")
    return count


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
    """Run the call on the meta device (shapes only, nothing allocated) and count what it returns."""
    kwargs = {key: "meta" if key == "device" else _to_meta(value) for key, value in kwargs.items()}
    with torch.device("meta"):
        return _elements(fn(*_to_meta(tuple(args)), **kwargs))


class _ElementCounter(TorchDispatchMode):
    """Counts the elements every operation returns, while a module call is rehearsed on meta."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        self.elements += _elements(result)
        return result


def _rehearse(module: torch.nn.Module, path: str, args, kwargs) -> tuple[int, int]:
    weights = {name: tensor.to("meta") for name, tensor in
               list(module.named_parameters()) + list(module.named_buffers())}
    counter = _ElementCounter()
    try:
        with torch.device("meta"), counter:
            output = torch.func.functional_call(module, weights, _to_meta(tuple(args)), _to_meta(dict(kwargs)))
    except Exception as error:
        raise RefusedError(
            f"calling {path} on these values could not be checked ahead of running it "
            f"({type(error).__name__}: {error})"
        ) from None
    return _elements(output), counter.elements


def _shapes(value):
    """A hashable description of the shapes (and plain values) in call arguments."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if type(value) in (list, tuple):
        return tuple(_shapes(item) for item in value)
    if type(value) is dict:
        return tuple((key, _shapes(item)) for key, item in value.items())
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
    kept = obj.numel() if not shapes else rest * math.prod(torch.broadcast_shapes(*shapes))
    return max(kept, rest)


_RULES = {
    "same": _same, "broadcast": _broadcast, "nonzero": _nonzero, "concatenate": _concatenate,
    "pieces": _pieces, "matmul": _matmul, "product": _product, "index_select": _index_select,
    "repeat": _repeat, "expand": _expand, "repeat_interleave": _repeat_interleave, "size": _size,
    "new_size": _new_size, "range": _range, "eye": _eye, "data": _data, "new_data": _new_data,
    "linear": _linear, "embedding": _embedding, "tolist": _tolist, "meta": _meta, "index": _index,
    "scalar": _one, "attribute": _one, "container": _one,
}


# -- the model's state ---------------------------------------------------------------------------------
_HOOK_TABLES = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


def global_state() -> dict:
    """torch's process-wide settings a graph could change."""
    state = {
        "grad_enabled": torch.is_grad_enabled(),
        "default_dtype": torch.get_default_dtype(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "anomaly": torch.is_anomaly_enabled(),
    }
    for device in ("cpu", "cuda"):
        state[f"autocast_{device}"] = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
    return state


class ModelState:
    """Everything about `root` (and torch's global state) a run could change, and how to restore it.

    >>> net = torch.nn.Linear(2, 2)
    >>> state = ModelState(net)
    >>> net.weight.requires_grad_(False) is net.weight
    True
    >>> state.diff()
    ['weight: requires_grad True -> False']
    >>> state.restore(); state.diff()
    []
    """

    def __init__(self, root: torch.nn.Module, *, values: bool = True):
        self.root = root
        self.modules = [(name, module, module.__dict__.get("forward"), module.training,
                         {table: dict(getattr(module, table, {}) or {}) for table in _HOOK_TABLES})
                        for name, module in root.named_modules(remove_duplicate=False)]
        self.tensors = []
        for name, module in root.named_modules(remove_duplicate=False):
            for table in (module._parameters, module._buffers):
                for key, tensor in table.items():
                    if tensor is None:
                        continue
                    copy = tensor.detach().clone() if values and tensor.device.type != "meta" else None
                    hooks = dict(tensor._backward_hooks or {})
                    self.tensors.append((f"{name}.{key}".lstrip("."), table, key, tensor, tensor.requires_grad,
                                         tensor.grad, hooks, copy))
        self.globals = global_state()

    def diff(self) -> list[str]:
        """What differs from the snapshot, one line each (empty when nothing does)."""
        changes = []
        for name, module, forward, training, hooks in self.modules:
            if module.__dict__.get("forward") is not forward:
                changes.append(f"{name or '<root>'}: instance forward changed")
            if module.training != training:
                changes.append(f"{name or '<root>'}: training {training} -> {module.training}")
            for table, before in hooks.items():
                if dict(getattr(module, table, {}) or {}) != before:
                    changes.append(f"{name or '<root>'}: {table} changed")
        for name, table, key, tensor, requires_grad, grad, hooks, copy in self.tensors:
            if table.get(key) is not tensor:
                changes.append(f"{name}: replaced")
            if tensor.requires_grad != requires_grad:
                changes.append(f"{name}: requires_grad {requires_grad} -> {tensor.requires_grad}")
            if tensor.grad is not grad:
                changes.append(f"{name}: .grad changed")
            if dict(tensor._backward_hooks or {}) != hooks:
                changes.append(f"{name}: tensor hooks changed")
            if copy is not None and not _same_bits(tensor, copy):
                changes.append(f"{name}: values changed")
        now = global_state()
        changes += [f"torch global {key}: {value} -> {now[key]}" for key, value in self.globals.items() if now[key] != value]
        return changes

    def restore(self) -> None:
        for _, module, forward, training, hooks in self.modules:
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = forward
            module.training = training
            for table, before in hooks.items():
                current = getattr(module, table, None)
                if current is not None and dict(current) != before:
                    current.clear()
                    current.update(before)
        with torch.no_grad():
            for _, table, key, tensor, requires_grad, grad, hooks, copy in self.tensors:
                table[key] = tensor
                tensor.requires_grad_(requires_grad)
                tensor.grad = grad
                if tensor._backward_hooks is not None and dict(tensor._backward_hooks) != hooks:
                    tensor._backward_hooks.clear()
                    tensor._backward_hooks.update(hooks)
                if copy is not None and not _same_bits(tensor, copy):
                    tensor.copy_(copy)
        restore_global_state(self.globals)


def restore_global_state(state: dict) -> None:
    """Put back the settings of `state` that differ now (setting them all costs ~100 us)."""
    now = global_state()
    if now["grad_enabled"] != state["grad_enabled"]:
        torch.set_grad_enabled(state["grad_enabled"])
    if now["default_dtype"] != state["default_dtype"]:
        torch.set_default_dtype(state["default_dtype"])
    if now["deterministic"] != state["deterministic"]:
        torch.use_deterministic_algorithms(state["deterministic"])
    if now["anomaly"] != state["anomaly"]:
        torch.set_anomaly_enabled(state["anomaly"])
    for device in ("cpu", "cuda"):
        key = f"autocast_{device}"
        if now[key] != state[key]:
            torch.set_autocast_enabled(device, state[key][0])
            torch.set_autocast_dtype(device, state[key][1])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach().contiguous().reshape(-1), b.contiguous().reshape(-1)
    if a.dtype.is_floating_point or a.dtype.is_complex:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)
