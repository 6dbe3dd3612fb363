"""What a run may do to the shared model and to the process: writes to weights, sizes, time.

`Guard` is consulted by the interleaver before every operation it runs.

- Writes: in an untrusted run every call that could reach a weight (or a tensor it was handed as an
  `out`) runs under `writes.WriteCheck`, which refuses any aten operator whose schema writes a weight's
  storage, before it runs (a call that can reach neither runs without it: see
  `Guard.reaches_no_weight`; nor does a function call whose earlier call on arguments of the same shapes ran
  no operator that declares a write, see `Guard.call`, nor a module call whose rehearsal on the meta device saw
  no operator declare a write to a tensor the call did not make, and which is handed no weight: see
  `Guard.call_module`; the counters of the weights either was handed are compared after it); the weights'
  version counters (`writes.Versions`) are a second line, checked after calls that received a weight and after
  every run (`check_versions`). Nothing is copied for it: a write the schemas did not declare leaves the
  weights changed, and the run fails saying so (`WeightsChangedError`), so that whoever hosts the
  model reloads it (`server.hosting`). In a local run an in-place operation on a weight's storage copies it first
  and the copy is put back when the run ends, so after every trace the weights are what they were;
  which storages are weights is listed once per model (`tree.ModelTree`, as are the weights an
  untrusted run checks), so a local trace that writes no weight pays a dict lookup per in-place
  operation, not a walk over the model.
- Sizes (untrusted runs): each allowed operation has a size rule (named in `ops`) that bounds the
  elements of its result from its arguments' shapes; the bound is checked against `Limits` before
  the call allocates anything. Python values (ints, strings, lists) are bounded the same way.
- Time (untrusted runs): a deadline and a cancel flag, checked between operations.
- Memory a job did not write (untrusted runs): the graph's operations run under `state.initialized_memory`, so
  what an earlier job left in freed memory never reaches a later one.

The size rules themselves live in `sizes`; the snapshot of a model's state in `state`.
"""

from __future__ import annotations

import operator
import time

import torch
from torch._subclasses.fake_tensor import FakeTensor

from .. import ops
from ..errors import CancelledError, LimitError, RefusedError, WeightsChangedError
from .limits import DEFAULT, Limits
from .tree import ModelTree
from .sizes import PYTHON_REFERENCE, PYTHON_TENSOR, RULES, elements, rehearse, shapes
from .writes import Versions, WriteCheck, refuse_weight_write

_SEQUENCES = (str, bytes, list, tuple)
REHEARSALS = 256  # module calls' rehearsals kept per model, by path and shapes (and as many pure calls)


class Guard:
    """Checks for one run; `untrusted` adds the budget and allow-list checks to the write checks."""

    def __init__(self, root: torch.nn.Module, *, untrusted: bool, limits: Limits | None = None,
                 cancel=None):
        self.root = root
        self.untrusted = untrusted
        self.limits = limits or DEFAULT
        self.cancel = cancel  # anything with is_set(), e.g. a threading.Event
        self.deadline = time.monotonic() + self.limits.max_seconds if untrusted else None
        self.created = 0  # elements created so far
        self._guarded: dict[int, torch.Tensor] | None = None  # untrusted: data_ptr -> weight (see `_weights`)
        self._tree: ModelTree | None = None  # local: the model's, looked up at the first call or write of a run
        self._named: dict[int, torch.Tensor] = {}  # data_ptr -> weight a `parameter` node read in this run
        self._copies: dict[int, tuple] = {}  # local: data_ptr -> (weight storage, its bytes as they were)
        self.versions = Versions(root) if untrusted else None  # the second line against writes

    # -- writes ------------------------------------------------------------------------------------
    def named_weight(self, tensor) -> None:
        """A `parameter` node read `tensor` (a weight, found by name): its storage and its gradient's
        are weights for this run, whatever the index knows (a weight swapped in by hand, `.grad`)."""
        for held in (tensor, tensor.grad):
            if isinstance(held, torch.Tensor) and held.device.type != "meta" and held.numel():
                self._named[held.untyped_storage().data_ptr()] = held

    def before_write(self, value, what) -> None:
        """`value` is about to be changed in place: refuse (untrusted) or keep a copy (local).

        what: the operation, for the error message (a node: described only when refused)."""
        if type(value) is not torch.Tensor and (not isinstance(value, torch.Tensor) or isinstance(value, FakeTensor)):
            return  # (a plain tensor, the common case, is told apart without the slower isinstance checks)
        storage = value.untyped_storage()
        pointer = storage.data_ptr()
        if not pointer or pointer in self._copies:  # (meta and empty tensors have no memory to keep)
            return
        if pointer not in self._named and not self._is_weight(pointer):
            return
        if self.untrusted:
            raise refuse_weight_write(what if isinstance(what, str) else what.describe())
        self._keep(storage)

    def local_call(self, fn, args, kwargs):
        """A local run's call of an allowed function. One handed a weight (or a view of one) runs under the
        operators' schemas (`WriteCheck`), which copy the weight before an operator writes it
        (`F.relu(w, inplace=True)`, `out=w`: no name says so), so the run puts it back; others run as they are."""
        if self.holds_no_weight((*args, *kwargs.values()) if kwargs else args):
            return fn(*args, **kwargs)
        with WriteCheck({**self.tree().tensors, **self._named}, "a call", keep=self._keep):
            return fn(*args, **kwargs)

    def holds_no_weight(self, values) -> bool:
        """Whether none of the tensors `values` (a local run's arguments, top level) is a weight or shares the
        memory of one: a call with them cannot write a weight."""
        tree = self._tree or self.tree()
        weights, named = tree.tensors, self._named
        for value in values:  # (a stale entry of the tree only costs WriteCheck's look)
            kind = type(value)
            if kind is torch.Tensor or kind is torch.nn.Parameter or (
                    isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor)):
                pointer = value.untyped_storage().data_ptr()
                if pointer and (pointer in weights or pointer in named):
                    return False
        return True

    def weight_memory(self) -> tuple[dict, dict]:
        """The storage pointers of the weights, for `holds_no_weight`'s test done inline (where a call is what
        costs): the model's (`ModelTree.tensors`) and those this run's `parameter` nodes named, which grows."""
        return (self._tree or self.tree()).tensors, self._named

    def tree(self) -> ModelTree:
        """The model's `ModelTree`, looked up once a run."""
        if self._tree is None:
            self._tree = ModelTree.of(self.root)
        return self._tree

    def _keep(self, storage: torch.UntypedStorage) -> None:
        """Copy a weight's storage (once a run) before it is written; `restore_weights` puts it back."""
        pointer = storage.data_ptr()
        if pointer not in self._copies:
            self._copies[pointer] = (storage, storage.clone())

    def _is_weight(self, pointer: int) -> bool:
        if self.untrusted:  # every weight, and the gradients the graph named
            return pointer in self._weights()
        return self.tree().holds(pointer)

    def _weights(self) -> dict[int, torch.Tensor]:
        """data_ptr -> a tensor in that storage, of every weight (as the model's tree lists them once) and of
        every weight and gradient a `parameter` node read (`named_weight`). A graph reaches a weight's gradient
        only through such a node's `.grad`, so no other gradient needs a look (a walk over every weight's
        `.grad` cost ~0.6 ms a run on SmolLM2)."""
        if self._guarded is None:
            self._guarded = ModelTree.of(self.root).tensors  # (the tree's: not to be changed)
        named = self._named
        if named and not named.keys() <= self._guarded.keys():
            return {**self._guarded, **named}
        return self._guarded

    # -- writes in an untrusted run: decided by torch's operator schemas -----------------------------
    def call(self, what: str, fn, args, kwargs, *, module: torch.nn.Module | None = None):
        """`fn(*args, **kwargs)` in an untrusted run: no operator inside it may write a weight.

        A function call runs under the write check (`WriteCheck`) unless nothing a weight shares is in its
        reach (`reaches_no_weight`), or an earlier call of the same function on arguments of the same shapes
        ran operators none of whose schemas declares a write (the model's `ModelTree.pure_calls`, at most
        `REHEARSALS` of them, each a small key: see `_look_through`): `x @ w.T` on a weight, after its first
        call, runs as it is, and the counters of the weights it was handed are compared after it, as after a
        module call whose rehearsal saw no write. Which operators a call of an allowed function runs follows
        from its arguments' shapes and types (the key), and the counters catch a write that did not.

        If a weight's version counter moved anyway (an operator whose schema does not declare its write),
        the call fails (`check_versions`).
        """
        key = None
        if module is None:
            if self.reaches_no_weight(fn, args, kwargs):
                return fn(*args, **kwargs)  # nothing a weight shares is in reach: the dispatch mode costs 4-70 µs
            handed, described = self._look_through((*args, *kwargs.values()))
            if described is not None:
                key, pure = (fn, len(args), *kwargs, described), self.tree().pure_calls
                if key in pure:
                    result = fn(*args, **kwargs)
                    if handed:
                        self.check_versions(what, handed)
                    return result
        check = WriteCheck(self._weights(), what)
        with check:
            result = fn(*args, **kwargs)
        if check.touched:
            self.check_versions(what, check.touched)
        if key is not None and not check.declared_write:
            if len(pure) >= REHEARSALS:  # (bounded: a stranger chooses the shapes)
                del pure[next(iter(pure))]
            pure[key] = None
        return result

    def reaches_no_weight(self, fn, args, kwargs=None) -> bool:
        """Whether no operator inside the call can reach a weight or a tensor it was handed as an `out`: the
        tensors it is handed are plain strided tensors that share no weight's storage and have no autograd
        graph (through which a backward reaches weights' .grad), and are its first argument alone (the receiver
        of an allowed in-place operation; a second tensor may be a positional `out`, `torch.norm(x, "fro",
        None, False, y)`), or any of its operands where `fn` is one of Python's operators (`operator.iadd`
        for `h += steer`: its arguments are its operands, so none is an `out`). The rest are plain numbers,
        strings, shapes and slices, in tuples and lists. A call handed no tensor (a step's `int(3)`) writes none,
        nor does `getattr` of anything but a tensor: `before_call` allowed it only the fields of a model output or
        of one of torch's named tuples, read as they are (a tensor's attributes, `.T`, run operators)."""
        first = args[0] if args else None
        if fn is getattr and not isinstance(first, torch.Tensor):
            return True
        operands = getattr(fn, "__module__", None) == _OPERATORS
        tensors = []
        if type(first) is torch.Tensor:
            tensors.append(first)
        elif type(first) not in _INERT:  # (not a container: a tensor in one would be no receiver)
            return False
        pending = [*args[1:], *kwargs.values()] if kwargs else list(args[1:])
        while pending:
            value = pending.pop()
            kind = type(value)
            if kind in _INERT:
                continue
            if kind is tuple or kind is list:
                pending += value
            elif kind is slice:
                pending += (value.start, value.stop, value.step)
            elif kind is torch.Tensor and operands:
                tensors.append(value)
            else:
                return False
        weights = self._weights() if tensors else None
        for tensor in tensors:
            if tensor.layout is not torch.strided or tensor.requires_grad or tensor.grad_fn is not None or (
                    tensor.untyped_storage().data_ptr() in weights):
                return False
        return True

    def check_versions(self, what: str = "the run", storages=None) -> None:
        """The second line: fail if any weight's version counter moved (of the weights in `storages`, data
        pointers, when given: those a call saw). Nothing was copied to put back: the weights stay
        changed, and the error says which (`WeightsChangedError.changed`)."""
        changed = self.versions.changed(storages) if self.versions is not None else []
        if not changed:
            return
        self.versions.tree.forget_reads()
        self.versions = Versions(self.root)  # reported once: a later check of this run counts from here
        raise WeightsChangedError(
            f"{what} changed weight(s) {', '.join(changed[:5])} of the shared model in a write no "
            "operator's schema declared, so the run is refused. The weights stay changed: the server must reload "
            "the model before it runs another job. Compute on a copy (`w.clone()`).", changed=changed)

    def restore_weights(self, *held: dict) -> None:
        """Put back every weight storage a local run changed (an untrusted run copies none: it writes none).
        A value of `held` (node -> value: the run's results, the values it keeps for a session's later traces) in
        such a storage (a module's output that is a view of its weight) is copied first, once wherever it is
        held: it keeps what the run made, which the model does not."""
        if self._copies:
            ModelTree.of(self.root).forget_reads()  # (putting them back moves their counters)
            copies: dict[int, tuple] = {}  # id of a value -> (it, its copy): the value is held while its id is used
            for values in held:
                for node, value in values.items():
                    if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() in self._copies:
                        if id(value) not in copies:
                            copies[id(value)] = (value, value.detach().clone())
                        values[node] = copies[id(value)][1]
            with torch.no_grad():
                for storage, copy in self._copies.values():
                    storage.copy_(copy)
            self._copies.clear()
        self._named.clear()
        self._tree = None  # the next run looks again: the model may change between runs

    # -- budgets (untrusted runs) ----------------------------------------------------------------------
    def tick(self) -> None:
        """Between operations: stop when cancelled or past the deadline."""
        if self.cancel is not None and self.cancel.is_set():
            raise CancelledError("the run was cancelled")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise LimitError(f"the run took longer than its limit of {self.limits.max_seconds:g} s (max_seconds)")

    def before_call(self, name: str, fn, args, kwargs) -> None:
        """Checks before calling function entry `name` (untrusted runs)."""
        if kwargs:  # (most calls have none: no call made for them)
            _refuse_out_arguments(kwargs)
        if name in _GROWING:
            self._python_growth(name, args)
        if name == "builtins.getattr":
            _check_attribute(args)
        self._count(name, fn, ops.size_rule(name), args, kwargs)

    def before_method(self, name: str, args, kwargs) -> None:
        """Checks before calling method `name` on `args[0]` (untrusted runs)."""
        receiver = args[0] if args else None
        if kwargs:  # (most calls have none: no call made for them)
            _refuse_out_arguments(kwargs)
        if isinstance(receiver, torch.Tensor):
            if name not in ops.TENSOR_METHODS:
                raise RefusedError(f"tensors have no allowed method {name!r}")
            if name in ops.AUTOGRAD_METHODS:  # flags, not data: no operator schema describes them
                self.before_write(receiver, f".{name}()")
            self._count(f"Tensor.{name}", getattr(torch.Tensor, name), ops.TENSOR_METHODS[name], args, kwargs)
            return
        kind = list if isinstance(receiver, list) else dict if isinstance(receiver, dict) else None
        if kind is None or name not in ops.CONTAINER_METHODS[kind]:
            raise RefusedError(f"method {name!r} is not allowed on a {type(receiver).__name__}")
        if name == "extend":
            self._items(len(receiver) + _length_of(args[1] if len(args) > 1 else ()), PYTHON_REFERENCE)

    def before_module_call(self, module: torch.nn.Module, path: str, args, kwargs) -> frozenset | None:
        """Calling a module on values: its output and everything it makes inside are bounded first.

        The arguments are checked first: tensors and plain numbers only (in tuples and lists), so no
        path, repo id, callable, config or cache object reaches a forward. Then the call is rehearsed
        on the meta device (shapes only), counting the elements of every operation inside it and noting
        whether any operator's schema declares a write to a tensor the call did not make;
        rehearsals are kept with the model (its `ModelTree`, at most `REHEARSALS` of them) and reused for
        calls with the same shapes, by later requests too: a rehearsal costs milliseconds.

        Returns what `call_module` needs: the data pointers of the module's weights where the rehearsal saw
        no such write, else None.
        """
        _check_module_arguments(path, args, kwargs)
        key = (path, shapes(args), shapes(kwargs))
        rehearsals = self.tree().rehearsals  # (what a call with these shapes does is the model's: kept with its tree)
        counted = rehearsals.get(key)
        if counted is None:
            *counted, writes = rehearse(module, path, args, kwargs)
            weights = frozenset(tensor.untyped_storage().data_ptr() for tensor in (*module.parameters(), *module.buffers())
                                if tensor.device.type != "meta" and tensor.numel())
            counted = (*counted, None if writes else weights)
            if len(rehearsals) >= REHEARSALS:  # (bounded: a stranger chooses the shapes)
                del rehearsals[next(iter(rehearsals))]
            rehearsals[key] = counted
        output, inside, flops, weights = counted
        if output > self.limits.max_elements:
            raise LimitError(f"calling {path} would create {output} elements, over the limit of "
                             f"{self.limits.max_elements} for one value (max_elements)")
        self._add(inside)
        self._work(f"calling {path}", flops)
        return weights

    def call_module(self, path: str, module: torch.nn.Module, args, kwargs, weights: frozenset | None):
        """Call `module` on values in an untrusted run (`weights`: what `before_module_call` returned).

        Where its rehearsal saw no operator declare a write to a tensor the call did not make, and no
        argument shares a weight's storage, the call runs as it is and the version counters of the module's
        weights are compared after it: the write check's dispatch mode looks at every operator inside
        (~0.2 ms a call of a Llama norm). Otherwise it runs under the write check (`call`).
        """
        what = f"calling {path}"
        if weights is None or self._look_through((*args, *kwargs.values()))[0] != set():
            return self.call(what, module, args, kwargs, module=module)
        result = module(*args, **kwargs)
        self.check_versions(what, weights)
        return result

    def _look_through(self, values) -> tuple[set[int] | None, tuple | None]:
        """(the storages (data pointers) of the weights and gradients among the tensors in `values`, in tuples and
        lists; a description of `values`: each tensor's shape, dtype and whether it requires grad, each other value
        and its type, each container's type and length, or None where it would be too large to keep: over
        `_KEY_ITEMS` items or a string over `_KEY_STRING` characters), or (None, None) where a value cannot be
        looked through: a tensor without a strided storage, a tensor subclass, anything but a number, string,
        shape, slice or None. (A loop, not a recursion: a stranger chooses how deep the lists go.)"""
        weights, handed, described, pending, small = self._weights(), set(), [], list(values), True
        while pending:
            value = pending.pop()
            kind = type(value)
            if kind is torch.Tensor or kind is torch.nn.Parameter:
                if value.layout is not torch.strided:
                    return None, None
                pointer = value.untyped_storage().data_ptr()
                if pointer in weights:
                    handed.add(pointer)
                described.append((value.shape, value.dtype, value.requires_grad))
            elif kind is tuple or kind is list:
                described.append((kind, len(value)))
                pending += value
            elif kind is slice:
                described.append(kind)
                pending += (value.start, value.stop, value.step)
            elif kind in _INERT:
                described.append((kind, value))  # (with its type: 1, 1.0 and True are equal keys)
                if kind is str and len(value) > _KEY_STRING:
                    small = False
            else:
                return None, None
        return handed, tuple(described) if small and len(described) <= _KEY_ITEMS else None

    def check_value(self, value) -> None:
        """After an operation: Python values it made stay within the limits (untrusted runs)."""
        if type(value) is not torch.Tensor:  # (the commonest result: bounded by its size rule before it was made)
            _check_python_value(value, self.limits)

    def check_replacement(self, old, new, what: str) -> None:
        """A swap or skip may not make the model compute on more elements than it would have."""
        before, after = elements(old), elements(new)
        if after > before:
            raise LimitError(
                f"{what} has {after} elements where the model's value has {before}; a replacement "
                "may not be larger than the value it replaces here"
            )

    def check_size(self, value, what: str) -> None:
        """A value that stands in for a module's whole output (skip) is at most one value's worth."""
        if elements(value) > self.limits.max_elements:
            raise LimitError(f"{what} has {elements(value)} elements, over the limit of {self.limits.max_elements} "
                             "for one value (max_elements)")

    def _count(self, name, fn, rule, args, kwargs) -> None:
        try:
            count = RULES[rule](args, kwargs, self.limits, fn)
        except (LimitError, RefusedError):
            raise
        except Exception:
            count = RULES["meta"](args, kwargs, self.limits, fn)  # arguments the formula does not expect
        flops = 0
        if type(count) is tuple:
            count, flops = count
        if count > self.limits.max_elements:
            raise LimitError(
                f"{name} would create {count} elements, over the limit of {self.limits.max_elements} "
                "for one value (max_elements)"
            )
        self._add(count)
        if flops:
            self._work(name, flops)

    def _work(self, what: str, flops: int) -> None:
        """A call's floating point operations, at the server's rate, must fit in the time the run has left."""
        if not flops or self.deadline is None:
            return
        seconds, left = flops / self.limits.flops_per_second, self.deadline - time.monotonic()
        if seconds > left:
            raise LimitError(
                f"{what} would do {flops:.3g} floating point operations, about {seconds:.3g} s at "
                f"{self.limits.flops_per_second:.3g} per second (flops_per_second), past the run's deadline "
                f"({max(left, 0):.3g} s left of max_seconds={self.limits.max_seconds:g}); use smaller operands"
            )

    def _add(self, count: int) -> None:
        limits = self.limits
        self.created += count
        if self.created > limits.max_total_elements:
            raise LimitError(
                f"the run would create more than {limits.max_total_elements} elements in all "
                "(max_total_elements); save less, or split the work into several requests"
            )

    def _python_growth(self, name: str, args) -> None:
        """Repetition, concatenation, formatting and int growth, bounded before Python computes them (for the
        operators and builtins in `_GROWING`)."""
        op = _operation(name)
        if op in ("list", "tuple", "dict") and args:
            self._items(_length_of(args[0]), PYTHON_TENSOR if isinstance(args[0], torch.Tensor) else PYTHON_REFERENCE)
        if len(args) != 2:
            return
        a, b = args
        if op == "mul":
            for seq, times in ((a, b), (b, a)):
                if isinstance(seq, _SEQUENCES) and (count := _repeat_count(times)) is not None:
                    self._items(len(seq) * max(count, 0), PYTHON_REFERENCE)
        elif op == "add" and isinstance(a, _SEQUENCES) and isinstance(b, _SEQUENCES):
            self._items(len(a) + len(b), PYTHON_REFERENCE)
        elif op == "mod" and isinstance(a, (str, bytes)):
            raise RefusedError("string formatting with % is not allowed here")
        elif op in ("pow", "lshift") and type(a) is int and type(b) is int and b > 0:
            if op == "pow" and abs(a) <= 1:
                return
            bits = a.bit_length() * b if op == "pow" else a.bit_length() + b
            if bits > self.limits.max_int_bits:
                raise LimitError(f"{name} would make an int of about {bits} bits, over the limit of "
                                 f"{self.limits.max_int_bits} (max_int_bits)")

    def _items(self, length: int, cost: int) -> None:
        """A Python container of `length` items, each costing `cost` elements of the run's budget."""
        self._length(length)
        self._add(length * cost)

    def _length(self, length: int) -> None:
        if length > self.limits.max_list_length:
            raise LimitError(f"a Python value would hold {length} items, over the limit of "
                             f"{self.limits.max_list_length} (max_list_length)")


def _repeat_count(value) -> int | None:
    """How many times Python repeats a sequence multiplied by `value`: what its type's `__index__` gives (an int,
    a bool, a one-element integer tensor); None when it has none (then Python does not repeat)."""
    if isinstance(value, _SEQUENCES):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


_INERT = frozenset((int, float, bool, complex, str, type(None), type(Ellipsis), torch.dtype, torch.device,
                    torch.Size, torch.layout, torch.memory_format))
_OPERATORS = operator.add.__module__  # the module of Python's operators ('_operator')
# a pure call's key is kept only if it is small: a stranger's million-item list would be held with the model
_KEY_ITEMS, _KEY_STRING = 32, 64


def _operation(name: str) -> str:
    """The operation of one of Python's operators or builtins, as `_python_growth` bounds it: `operator.iadd`'s is
    'add'."""
    op = name.split(".")[-1]
    return op[1:] if name in ops.MUTATING_TARGETS and op not in ("setitem", "delitem") else op


# the operators and builtins whose result can outgrow their arguments (the rest need no look: `_python_growth`)
_GROWING = frozenset(name for name in ops.FUNCTIONS if name.startswith(("operator.", "builtins."))
                     and _operation(name) in ("list", "tuple", "dict", "mul", "add", "mod", "pow", "lshift"))


def _refuse_out_arguments(kwargs) -> None:
    if "out" in kwargs:
        raise RefusedError("`out=` is not allowed here: use the returned value")


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


_NUMBERS = (bool, int, float)


def _check_module_arguments(path: str, args, kwargs) -> None:
    """A module called from an untrusted graph gets tensors, plain numbers and None, in tuples and lists."""
    def check(value, where: str) -> None:
        if isinstance(value, torch.Tensor) and type(value) in (torch.Tensor, torch.nn.Parameter) or value is None:
            return
        if type(value) in _NUMBERS:
            return
        if type(value) in (tuple, list):
            for number, item in enumerate(value):
                check(item, f"{where}[{number}]")
            return
        raise RefusedError(
            f"calling {path or 'the model'} with {where} = a {type(value).__name__} is not allowed here: a module "
            "called from a graph takes tensors and plain numbers (in tuples and lists) only"
        )

    for number, value in enumerate(args):
        check(value, f"argument {number}")
    for name, value in kwargs.items():
        check(value, f"keyword {name!r}")


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
