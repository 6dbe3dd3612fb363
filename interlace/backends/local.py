"""The local backend: interleave a graph with a real run of the model.

`Interleaver` hooks exactly the modules the graph names, runs the model, and, inside each hook,
executes every node that has become ready, in graph order. A node is ready when every node it reads
has run; a `module_value` node is ready only while its module's call is happening (an "event").
Replacements (`swap`) change the value the hook hands back to the model; an invoke's reads and
writes touch only its rows of the batch. When nothing in the graph waits on the model any more the
forward is stopped early. Every hook is removed afterwards, also on error.
"""

from __future__ import annotations

import builtins
import heapq
from contextlib import ExitStack

import torch

from .. import ops
from ..errors import (
    ExecutionError,
    InterlaceError,
    ModelError,
    OutOfOrderError,
    describe_location,
)
from ..graph import OPS, Graph, Ref, map_refs

_PENDING = object()  # a node that waits for a later event (a gradient)
_VIEW_TARGETS = frozenset({"operator.getitem", "builtins.getattr"})
# op -> method name; looked up on each call, as a table of bound methods would make the
# interleaver a reference cycle and keep its values (activations) alive until the garbage collector
_METHODS = {op: "_op_" + op for op in OPS}


class EarlyStop(Exception):
    """Raised inside a hook to end the forward pass; never escapes `Interleaver.run`."""


class _Event:
    __slots__ = ("key", "value", "changed")

    def __init__(self, key, value):
        self.key, self.value, self.changed = key, value, False


class Interleaver:
    """Executes `graph` while `run()` calls the model `root`.

    rows: for each invoke, its (start, stop) rows of the batch; `batch_size` the total.
    """

    def __init__(
        self, graph: Graph, root: torch.nn.Module, rows, batch_size: int, *,
        early_stop: bool = True, strict: bool = True, modules: dict | None = None,
        span: tuple[int, int] | None = None, known: dict | None = None, keep=(),
    ):
        self.graph, self.nodes, self.root = graph, graph.nodes, root
        # a session runs a graph in spans, one forward each: nodes before `span` ran earlier and
        # `known` holds the values of theirs that this span reads; `keep` must outlive the span
        self.start, self.end = span or (0, len(graph))
        self.keep = set(keep)
        self.strict = strict  # False: calls never reached (generation ended early) are no error
        self.extra_modules = modules or {}  # paths outside the model's tree, e.g. 'generator' 
        self.rows = rows if len(rows) > 1 else None  # one invoke: nothing to narrow
        self.batch_size = batch_size
        self.early_stop = early_stop
        self.values: dict[int, object] = dict(known or {})
        self.results: dict[int, object] = {}
        self.events: list[_Event] = []
        self.open_sources: set[int] = set()  # sources whose event is on but whose guard is not
        self.calls: dict[tuple, int] = {}
        self.skips: dict[tuple, tuple] = {}
        self.bypass = False
        self.stopped = False
        self.handles: list = []
        self._plan()

    # -- planning ------------------------------------------------------------------------------
    def _plan(self) -> None:
        nodes = self.nodes
        n = len(nodes)
        self.users: list[list[int]] = [[] for _ in range(n)]
        self.waiting = [0] * n
        self.remaining = [0] * n
        self.done = bytearray(n)
        self.done[: self.start] = b"\x01" * self.start
        self.total = self.end - self.start
        self.finished = 0
        self.sources: dict[tuple, list[int]] = {}
        self.event_keys: dict[int, tuple] = {}
        self.mutations: dict[tuple, list[int]] = {}
        self.skip_nodes: dict[tuple, int] = {}
        self.saved = set(self.graph.saved()) | self.keep | set(self.values)
        self.needs_grad = False
        last_mutation: dict[int, int] = {}
        ready = []
        start = self.start
        users, waiting, remaining = self.users, self.waiting, self.remaining
        for node in nodes[start : self.end]:
            index, op = node.index, node.op
            reads = [ref for ref in node.refs() if ref >= start]
            for ref in reads:
                remaining[ref] += 1
            deps = reads
            if op == "stop":  # stop once everything recorded before it has run
                deps = range(start, index)
            elif last_mutation:  # a read of a value waits for the in-place changes recorded before it
                changes = [last_mutation[ref] for ref in reads if ref in last_mutation]
                if changes:
                    deps = list(dict.fromkeys(reads + changes))
            for dep in deps:
                users[dep].append(index)
            waiting[index] = len(deps)
            if op == "module_value":
                key = self._event_of(index)
                self.event_keys[index] = key
                self.sources.setdefault(key, []).append(index)
            elif op == "skip":
                self.skip_nodes[(node.target, node.kwargs["call"])] = index
            elif op == "grad" or (op == "call_method" and node.target == "backward"):
                self.needs_grad = True
            if _mutates(node) and type(node.args[0]) is Ref:
                last_mutation[node.args[0].index] = index
                key = self._event_of(node.args[0].index)
                if key is not None:
                    self.mutations.setdefault(key, []).append(index)
            if not deps and op != "module_value":
                ready.append(index)
        self.ready = ready  # already in graph order, so a valid heap

    def _event_of(self, index: int):
        """The module event whose value node `index` views, or None for computed values."""
        node = self.nodes[index]
        while node.op == "call" and node.target in _VIEW_TARGETS and type(node.args[0]) is Ref:
            node = self.nodes[node.args[0].index]
        if node.op == "module_value":
            kind = "output" if node.kwargs["kind"] == "output" else "input"
            return (node.target, kind, node.kwargs["call"])
        if node.op == "grad":
            return ("grad", node.index)
        return None

    # -- running ---------------------------------------------------------------------------------
    def run(self, forward):
        """Call `forward()` (which runs the model) with the graph interleaved; returns results."""
        grads = None
        with ExitStack() as stack:
            stack.callback(self._remove_hooks)
            if self.needs_grad:
                grads = {p: p.grad for p in self.root.parameters()}
                stack.callback(_restore_grads, grads)
            else:
                stack.enter_context(torch.no_grad())
            self._drain()
            if self.finished < self.total or not self.early_stop:
                self._install()
                try:
                    forward()
                except EarlyStop:
                    pass
                except InterlaceError:
                    raise
                except Exception as error:
                    raise self._model_error(error) from error
            self._check_finished()
        return self.results

    def _install(self) -> None:
        outputs = {key[0] for key in self.sources if key[1] == "output"}
        inputs = {key[0] for key in self.sources if key[1] == "input"}
        skipped = {key[0] for key in self.skip_nodes}
        for path in outputs | inputs | skipped:
            module = self._module_at(path)
            if path in inputs:
                hook = self._pre_hook(path)
                self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            if path in outputs:
                hook = self._post_hook(path)
                self.handles.append(module.register_forward_hook(hook))
            if path in skipped:
                self._patch_forward(module, path)

    def _module_at(self, path: str) -> torch.nn.Module:
        if path in self.extra_modules:
            return self.extra_modules[path]
        try:
            return self.root.get_submodule(path)
        except AttributeError:
            raise InterlaceError(f"the model has no module '{path}'") from None

    def _remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _count(self, path: str, kind: str) -> int:
        key = (path, kind)
        call = self.calls.get(key, 0)
        self.calls[key] = call + 1
        return call

    def _pre_hook(self, path):
        def hook(module, args, kwargs):
            if self.bypass:
                return None
            key = (path, "input", self._count(path, "input"))
            if key not in self.sources:
                return None
            event = self._event(key, (args, kwargs))
            return event.value if event.changed else None

        return hook

    def _post_hook(self, path):
        def hook(module, args, output):
            if self.bypass:
                return None
            key = (path, "output", self._count(path, "output"))
            if key not in self.sources:
                return None
            event = self._event(key, output)
            return event.value if event.changed else None

        return hook

    def _patch_forward(self, module, path) -> None:
        original = module.forward

        def forward(*args, **kwargs):
            if self.bypass:
                return original(*args, **kwargs)
            call = self._count(path, "skip")
            index = self.skip_nodes.get((path, call))
            if index is None:
                return original(*args, **kwargs)
            if not self.done[index]:
                raise self._out_of_order(index, f"{path} (call {call}) runs")
            value, rows = self.skips[(path, call)]
            if rows is None:
                return value
            return _write_rows(original(*args, **kwargs), value, rows)

        module.forward = forward
        self.handles.append(_DeleteAttribute(module, "forward"))

    def _event(self, key, value) -> _Event:
        event = _Event(key, value)
        self.events.append(event)
        try:
            sources = self.sources.pop(key)
            for index in sources:
                if self.waiting[index]:  # guarded by a cond computed during this event
                    self.open_sources.add(index)
                else:
                    heapq.heappush(self.ready, index)
            self._drain()
            for index in sources + self.mutations.get(key, []):
                if not self.done[index]:
                    raise self._out_of_order(index, f"{key[0]}.{key[1]} (call {key[2]}) ends")
        finally:
            self.events.pop()
        if self.early_stop and self.finished == self.total and not self.events:
            raise EarlyStop()
        return event

    def _drain(self) -> None:
        ready = self.ready
        while ready:
            self._execute(heapq.heappop(ready))

    def _execute(self, index: int) -> None:
        node = self.nodes[index]
        if node.guard is not None and not self.values.get(node.guard):
            value = None  # a false (or skipped) cond: the node does not run
        else:
            try:
                value = getattr(self, _METHODS[node.op])(node)
            except (InterlaceError, EarlyStop):
                raise
            except Exception as error:
                raise self._execution_error(node, error) from error
            if value is _PENDING:
                return
        self._finish(index, value)

    def _finish(self, index: int, value) -> None:
        self.values[index] = value
        self.done[index] = 1
        self.finished += 1
        waiting, ready = self.waiting, self.ready
        for user in self.users[index]:
            waiting[user] -= 1
            if not waiting[user]:
                if self.nodes[user].op != "module_value":
                    heapq.heappush(ready, user)
                elif user in self.open_sources:
                    self.open_sources.discard(user)
                    heapq.heappush(ready, user)
        # free inputs whose last reader has run
        remaining, saved, start = self.remaining, self.saved, self.start
        for ref in self.nodes[index].refs():
            if ref >= start:
                remaining[ref] -= 1
                if not remaining[ref] and ref not in saved:
                    self.values.pop(ref, None)
        if not remaining[index] and index not in saved:
            self.values.pop(index, None)

    def _resolve(self, obj):
        return map_refs(obj, lambda ref: self.values[ref.index])

    # -- one method per op -----------------------------------------------------------------------
    def _op_module_value(self, node):
        event = self._find_event(node.index)
        value = event.value
        kind = node.kwargs["kind"]
        if kind == "input":
            args, kwargs = value
            value = args[0] if args else next(iter(kwargs.values()), None)
        elif kind == "inputs":
            value = (tuple(value[0]), dict(value[1]))
        rows = self._rows(node.kwargs["invoke"])
        return value if rows is None else _narrow(value, rows, self.batch_size)

    def _op_parameter(self, node):
        try:
            return self.root.get_parameter(node.target)
        except AttributeError:
            return self.root.get_buffer(node.target)

    def _op_call(self, node):
        fn = ops.resolve(node.target) if isinstance(node.target, str) else node.target
        return fn(*self._resolve(node.args), **self._resolve(node.kwargs))

    def _op_call_method(self, node):
        args = self._resolve(node.args)
        return getattr(args[0], node.target)(*args[1:], **self._resolve(node.kwargs))

    _op_apply = _op_call

    def _op_save(self, node):
        index = node.args[0].index
        self.results[index] = self.values[index]
        return None

    def _op_swap(self, node):
        target = self.nodes[node.args[0].index]
        new = self._resolve(node.args[1])
        event = self._find_event(target.index)
        if target.op == "grad":
            event.value = new
        else:
            rows = self._rows(target.kwargs["invoke"])
            kind = target.kwargs["kind"]
            if kind == "output":
                event.value = new if rows is None else _write_rows(event.value, new, rows)
            elif kind == "input":
                event.value = _replace_first_input(event.value, new, rows)
            else:
                args, kwargs = new
                event.value = (tuple(args), dict(kwargs))
        event.changed = True
        return None

    def _op_skip(self, node):
        rows = self._rows(node.kwargs["invoke"])
        self.skips[(node.target, node.kwargs["call"])] = (self._resolve(node.args[0]), rows)
        return None

    def _op_module_call(self, node):
        module = self._module_at(node.target)
        self.bypass = True
        try:
            return module(*self._resolve(node.args), **self._resolve(node.kwargs))
        finally:
            self.bypass = False

    def _op_grad(self, node):
        tensor = self.values[node.args[0].index]
        if not isinstance(tensor, torch.Tensor) or not tensor.requires_grad:
            raise InterlaceError(
                "the value has no gradient: it is not part of the autograd graph (is it a tensor "
                "computed from the model's parameters or inputs that require grad?)"
            )
        self.handles.append(tensor.register_hook(lambda grad: self._grad_event(node.index, grad)))
        return _PENDING

    def _grad_event(self, index: int, grad):
        event = _Event(("grad", index), grad)
        self.events.append(event)
        try:
            self._finish(index, grad)
            self._drain()
        finally:
            self.events.pop()
        return event.value if event.changed else None

    def _op_cond(self, node):
        return builtins.bool(self._resolve(node.args[0]))

    def _op_stop(self, node):
        self.stopped = True
        self._finish(node.index, None)
        raise EarlyStop()

    def _op_log(self, node):
        print(*self._resolve(node.args))
        return None

    # -- helpers ---------------------------------------------------------------------------------
    def _rows(self, invoke):
        if self.rows is None or invoke is None:
            return None
        return self.rows[invoke]

    def _find_event(self, index: int) -> _Event:
        key = self.event_keys.get(index) or self._event_of(index)
        for event in reversed(self.events):
            if event.key == key:
                return event
        raise self._out_of_order(index, "its module runs")

    def _pending_source(self, index: int):
        """The first source (module value or gradient) that node `index` still waits for."""
        seen, stack = set(), [index]
        while stack:
            node = self.nodes[stack.pop()]
            if node.index in seen or self.done[node.index]:
                continue
            seen.add(node.index)
            if node.op in ("module_value", "grad"):
                return node
            stack.extend(sorted(node.refs(), reverse=True))
        return None

    def _out_of_order(self, index: int, moment: str) -> OutOfOrderError:
        node = self.nodes[index]
        source = self._pending_source(index)
        needs = f" needs {source.describe()} (recorded at {describe_location(source.location)})" if source else ""
        return OutOfOrderError(
            f"{describe_location(node.location)}\n  {node.describe()}{needs}, which the model "
            f"has not computed yet when {moment}. The model computes modules in the order it "
            "calls them: read values from earlier modules, or use .next() for a later call."
        )

    def _execution_error(self, node, error: Exception) -> ExecutionError:
        waiting = f" in the hook of {self._event_name()}" if self.events else ""
        return ExecutionError(
            f"{describe_location(node.location)}\n  {type(error).__name__}: {error}\n"
            f"  while running {node.describe()}{waiting}. Check the shapes and indices on that line."
        )

    def _event_name(self) -> str:
        key = self.events[-1].key
        if key[0] == "grad":
            return f"the gradient of node %{key[1]}"
        return f"{key[0] or '<root>'} ({key[1]}, call {key[2]})"

    def _model_error(self, error: Exception) -> ModelError:
        pending = next((n for n in self.nodes[: self.end] if not self.done[n.index]), None)
        waiting = ""
        if pending is not None:
            source = self._pending_source(pending.index) or pending
            waiting = f" The graph was waiting for {source.describe()} ({describe_location(source.location)})."
        return ModelError(f"the model raised {type(error).__name__}: {error}.{waiting}")

    def _check_finished(self) -> None:
        if self.finished == self.total or self.stopped:
            return
        for pending in self.nodes[self.start : self.end]:
            if self.done[pending.index]:
                continue
            source = self._pending_source(pending.index) or pending
            if source.op == "module_value" and (
                source.kwargs.get("optional") or not self.strict and source.kwargs["call"] > 0
            ):
                continue  # a cached module that did not run, or a step generation never reached
            raise OutOfOrderError(f"{describe_location(pending.location)}\n  {self._never_ran(source)}.")

    def _never_ran(self, source) -> str:
        if source.op == "grad":
            return "its gradient was never computed: call .backward() on a loss inside the trace"
        if source.op == "module_value":
            path = source.target
            ran = self.calls.get((path, "output" if source.kwargs["kind"] == "output" else "input"), 0)
            return (
                f"{source.describe()} was never reached: {path or 'the model'} ran {ran} time(s) in "
                "this run. Check the call index (.next(), at_call) or whether the module runs at all"
            )
        return f"{source.describe()} never ran"


def _mutates(node) -> bool:
    if node.op == "call":
        return node.target in ops.MUTATING_TARGETS
    return node.op == "call_method" and ops.is_in_place_method(node.target)


def _narrow(value, rows, batch_size):
    """The invoke's rows of every batch-first tensor in `value` (views, so writes go through)."""
    if isinstance(value, torch.Tensor):
        if value.dim() and value.shape[0] == batch_size:
            return value[rows[0] : rows[1]]
        return value
    if isinstance(value, (tuple, list)):
        items = [_narrow(item, rows, batch_size) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return type(value)(**{k: _narrow(v, rows, batch_size) for k, v in value.items()})
    return value


def _write_rows(dest, new, rows):
    """A copy of `dest` whose rows `rows` of batch-first tensors hold `new`."""
    if isinstance(dest, torch.Tensor):
        dest = dest.clone()
        dest[rows[0] : rows[1]] = new
        return dest
    if isinstance(dest, (tuple, list)):
        items = [_write_rows(d, n, rows) for d, n in zip(dest, new)]
        return type(dest)(*items) if hasattr(dest, "_fields") else type(dest)(items)
    if isinstance(dest, dict):
        return type(dest)(**{k: _write_rows(v, new[k], rows) for k, v in dest.items()})
    return new


def _replace_first_input(value, new, rows):
    args, kwargs = value
    if rows is not None:
        old = args[0] if args else next(iter(kwargs.values()))
        new = _write_rows(old, new, rows)
    if args:
        return ((new,) + tuple(args[1:]), kwargs)
    first = next(iter(kwargs))
    return (args, {**kwargs, first: new})


def _restore_grads(grads) -> None:
    for param, grad in grads.items():
        param.grad = grad


class _DeleteAttribute:
    """A handle that removes an instance attribute (our patched `forward`) on `remove()`."""

    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def remove(self) -> None:
        self.obj.__dict__.pop(self.name, None)
