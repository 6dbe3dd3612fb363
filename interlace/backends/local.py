"""The local backend: interleave a graph with a real run of the model.

`Interleaver` hooks exactly the modules the graph names, runs the model, and, inside each hook,
executes every node that has become ready, in graph order (`Plan` says what each node waits for). A
`module_value` node is ready only while its module's call is happening (an "event"). Replacements
(`swap`) change the value the hook hands back to the model; an invoke's reads and writes touch only
its rows of the batch. When nothing in the graph waits on the model any more the forward is stopped
early. Every hook is removed afterwards, also on error, and the model is left as it was (`Guard`).

An untrusted run (what a server does with a stranger's graph) also checks the graph against the
model first, runs only allow-listed operations, refuses writes to weights, bounds every value before
it is made, returns `log` output instead of printing it, and never opens the files its locations
name.
"""

from __future__ import annotations

import builtins
import heapq
import operator
import sys
import warnings
from threading import get_ident

import torch
from torch.utils.hooks import RemovableHandle

from .. import ops
from ..ops import FUNCTIONS
from ..errors import (
    ExecutionError,
    InterlaceError,
    ModelError,
    OutOfOrderError,
    RefusedError,
    describe_location,
    did_you_mean,
)
from ..graph import OPS, Graph, Ref, map_refs, summary
from ..source import Point, submodule
from .guard import Guard
from .limits import Limits
from .plan import Plan
from .rows import first_input, first_input_place, narrow, replace_first_input, write_rows
from .state import Attachments, global_state, initialized_memory, restore_global_state
from .validate import check_against_model

ENDED_EARLIER = "its module did not run that many times (the generation ended earlier)"
_PENDING = object()  # a node that waits for a later event (a gradient)
_NONE: dict = {}  # (a hook's events of a kind it has none of; never written)
_NEVER = sys.maxsize  # a module call no run reaches
_MISSING = object()
# op -> method name; looked up on each call, as a table of bound methods would make the
# interleaver a reference cycle and keep its values (activations) alive until the garbage collector
_METHODS = {op: "_op_" + op for op in OPS}
_push, _pop = heapq.heappush, heapq.heappop
_getitem, _setitem = operator.getitem, operator.setitem


class EarlyStop(Exception):
    """Raised inside a hook to end the forward pass; never escapes `Interleaver.run`."""


class _Event:
    __slots__ = ("key", "value", "changed")

    def __init__(self, key, value):
        self.key, self.value, self.changed = key, value, False


class Interleaver:
    """Executes `graph` while `run()` calls the model `root`.

    rows: for each invoke, its (start, stop) rows of the batch; `batch_size` the total.
    untrusted: run a stranger's graph (see the module docstring) within `limits`; `cancel` (anything
    with `is_set()`) stops it between operations. `guard`: the Guard of the request this run is part of
    (default: a new one from `untrusted`, `limits` and `cancel`).
    """

    # (slots: past 30 attributes an instance's dict no longer shares its keys with the other instances', so
    # each trace would build one and grow it four times: ~10 % of an empty trace's cache misses, misses.py)
    __slots__ = (
        "graph", "nodes", "root", "start", "end", "strict", "extra_modules", "rows", "shared", "batch_size",
        "early_stop", "untrusted", "guard", "values", "results", "logs", "not_run", "events", "open_sources",
        "calls", "skip_values", "bypass", "stopped", "skip_to", "unlike", "handles", "plan", "deferred_from",
        "grad_sources", "row_slices", "users", "waiting", "remaining", "sources", "stores_back", "saved", "ready",
        "plain_calls", "done", "total", "finished", "owner", "weight_memory",
    )

    plain_calls_allowed = True  # False where a subclass checks the arguments of every call (merge.py)
    defers_copies = True  # plan a generation's per-step copies as their steps come (see Plan)

    def __init__(
        self, graph: Graph, root: torch.nn.Module, rows, batch_size: int, *,
        early_stop: bool = True, strict: bool = True, modules: dict | None = None,
        span: tuple[int, int] | None = None, known: dict | None = None, keep=(),
        untrusted: bool = False, limits: Limits | None = None, cancel=None, guard: Guard | None = None,
    ):
        self.graph, self.nodes, self.root = graph, graph.nodes, root
        # a session runs a graph in spans, one forward each: nodes before `span` ran earlier and
        # `known` holds the values of theirs that this span reads; `keep` must outlive the span
        self.start, self.end = span or (0, len(graph))
        self.strict = strict  # False: calls never reached (generation ended early) are no error
        self.extra_modules = modules or {}  # paths outside the model's tree, e.g. 'generator'
        self.rows = rows if len(rows) > 1 else None  # one invoke: nothing to narrow
        self.shared = False  # a batch shared with other users' jobs (merge.py): what has no rows is Shared
        self.batch_size = batch_size
        self.early_stop = early_stop
        self.untrusted = untrusted
        # one guard for all traces of a request: its deadline and budgets are the request's
        self.guard = guard or Guard(root, untrusted=untrusted, limits=limits, cancel=cancel)
        if untrusted:
            check_against_model(graph, root, self.extra_modules, len(rows), self.start, self.end)
        self.values: dict[int, object] = dict(known or {})
        self.results: dict[int, object] = {}
        self.logs: list[tuple[int, tuple]] = []  # untrusted runs return `log` output, not print it
        self.not_run: dict[int, str] = {}  # saved nodes that did not run: why
        self.events: list[_Event] = []
        self.open_sources: set[int] = set()  # sources whose event is on but whose guard is not
        # (path, kind: "input", "output", "skip") -> [its calls so far]: a hook holds the list, so counting a call
        # costs no lookup of its key
        self.calls: dict[tuple, list[int]] = {}
        self.skip_values: dict[tuple, tuple] = {}
        self.bypass = False
        self.stopped = False
        self.skip_to: int | None = None  # set by a session.stop(): the session goes on from this node
        self.unlike: list[str] = []  # replacements unlike what they replaced, and skips: a model error names them
        self.handles: list = []
        plan = self.plan = Plan(graph, self.start, self.end, defer_copies=self.defers_copies)
        # the first module call of the next copy still to plan: a hook reaching it plans it (see _plan_copies)
        self.deferred_from = plan.deferred[0][0] if plan.deferred else _NEVER
        # the module values whose gradient a .grad asks for: where their rows were cut from (see _gradient_target)
        self.grad_sources = _gradient_sources(graph.nodes, plan.gradients) if plan.gradients else set()
        self.row_slices: dict[int, tuple] = {}  # id of an invoke's rows -> (them, the whole tensor, rows)
        self.users, self.waiting, self.remaining = plan.users, plan.waiting, plan.remaining
        self.sources = plan.sources
        self.stores_back = plan.stores_back
        self.saved = plan.saved | set(keep) | set(self.values) if keep or self.values else plan.saved  # (never changed)
        self.ready = list(plan.ready)  # already in graph order, so a valid heap
        # calls of allowed operations that need none of _op_call's checks: _execute runs them itself
        self.plain_calls = plan.plain_calls if self.plain_calls_allowed and not untrusted else ()
        self.done = bytearray(self.end)
        if self.start:
            self.done[: self.start] = b"\x01" * self.start
        self.total = self.end - self.start
        self.finished = 0

    def is_cancelled(self) -> bool:
        """Whether the run was cancelled (a generation checks it between steps)."""
        cancel = self.guard.cancel
        return cancel is not None and cancel.is_set()

    def missing(self) -> dict[int, str]:
        """Saved nodes of this run that have no value, and why."""
        reasons = {}
        for index in self.plan.saved:
            if index >= self.start and index not in self.results:
                reasons[index] = self.not_run.get(index) or (
                    "the trace stopped (tracer.stop() or an early stop) before it was computed" if self.stopped
                    else ENDED_EARLIER
                )
        return reasons

    # -- running ---------------------------------------------------------------------------------
    def run(self, forward):
        """Call `forward()` (which runs the model) with the graph interleaved; returns results.

        forward=None runs the nodes that need no model (a session's own nodes between its traces).
        """
        # what the run changes is put back in reverse order (try/finally: an ExitStack costs ~10 µs a trace)
        if self.untrusted:  # allowed operations cannot change these: this is a second line of defence
            # (e.g. the hooks output_attentions leaves; a held model's copies are those the last run left)
            state, attachments = global_state(), Attachments(self.root, carried=True)
        if self.plan.needs_grad:
            # fresh gradients for the run; the parameters' own .grad objects come back after it
            grads = {p: p.grad for p in self.root.parameters()}
            for param in grads:
                param.grad = None
        else:  # torch.no_grad() without its context object, which costs ~20 lines of torch a run
            grads, grad_was = None, torch.is_grad_enabled()
            torch._C._set_grad_enabled(False)
        # `weight.requires_grad_()` for one run's gradient: the flags come back after it
        flags = {p: p.requires_grad for p in self.root.parameters()} if self.plan.sets_requires_grad else None
        try:
            try:
                if self.ready:
                    self._drain()
                if forward is not None and (self.finished < self.total or not self.early_stop):
                    self._install()
                    forward()
            except EarlyStop:
                pass
            except InterlaceError:
                raise
            except Exception as error:
                raise self._model_error(error) from error
            if self.finished < self.total and not self.stopped:
                self._check_finished()
        finally:
            try:
                try:
                    if grads is None:
                        torch._C._set_grad_enabled(grad_was)
                    else:
                        _restore_grads(grads)
                    if flags is not None:
                        for param, flag in flags.items():
                            param.requires_grad_(flag)
                    if self.untrusted:
                        try:
                            self.guard.check_versions()
                        finally:
                            # (this run's hooks come off below)
                            attachments.restore(own=sum(type(handle) is RemovableHandle for handle in self.handles))
                            restore_global_state(state)
                finally:
                    self.guard.restore_weights(self.results, self.values)
            finally:
                if self.handles:
                    self._remove_hooks()  # whatever else failed, no hook stays on the model
        return self.results

    def _install(self) -> None:
        outputs, inputs = set(), set()
        for path, kind, _ in self.sources:  # (module events: path, "output" or "input", call)
            if kind == "output":
                outputs.add(path)
            elif kind == "input":
                inputs.add(path)
        # a streamed run goes on in a thread while its reader may call the same modules itself: only this
        # thread's calls are the run's (another's would be steered and counted as this run's next call)
        self.owner = get_ident()
        if self.untrusted:
            # the deadline and the cancel flag are checked between operations; a graph may have none
            # during a long generation (it saves only `generator.output`), but every step calls the root
            self.handles.append(self.root.register_forward_pre_hook(lambda module, args: self._step()))
        kept = edits = {}  # (where an invoke's rows are cut from a value, none)
        if self.rows is None:
            kept = self.plan.kept
            # not where a later trace of a session reads a node of this one that is not saved (it may be an
            # edit's, whose value the hook does not keep); values of earlier traces are no edit's
            carried = self.saved - self.plan.saved
            later = bool(carried) and max(carried) >= self.start
            edits = self.plan.edits  # (in an untrusted run too: see _edit)
            if edits and (later or not self.plain_calls_allowed):
                edits = {}
            if edits:
                self.weight_memory = self.guard.weight_memory()
        handles = self.handles
        # (_module_at's commonest case inline: it costs two calls a hooked module, on cold caches)
        by_path = self.guard.tree().by_path if (inputs or outputs) and not self.extra_modules else {}
        for path in inputs:
            module = by_path.get(path)
            if module is None:
                module = self._module_at(path)
            handles.append(module.register_forward_pre_hook(self._pre_hook(path), with_kwargs=True))
        for path in outputs:
            module = by_path.get(path)
            if module is None:
                module = self._module_at(path)
            # (a path whose first kept or edit event is a later copy's has no table yet: those go the general way)
            hook = self._post_hook(path, kept.get(path, _NONE), edits.get(path, _NONE))
            handles.append(module.register_forward_hook(hook, prepend=bool(module._forward_hooks)
                                                        and _only_recorders(module)))
        for path in {path for path, _ in self.plan.skips} if self.plan.skips else ():
            self._patch_forward(self._module_at(path), path)

    def _plan_copies(self, call: int) -> None:
        """Plan the copies of the block over steps whose module calls begin by `call`, and run what of them
        needs no module value (a step's number)."""
        for index in self.plan.plan_copies(call, self.done):
            _push(self.ready, index)
        deferred = self.plan.deferred
        self.deferred_from = deferred[0][0] if deferred else _NEVER
        self._drain()

    def _step(self) -> None:
        """Before each call of the whole model (each generation step): stop when cancelled or late."""
        self.guard.tick()

    def _module_at(self, path: str) -> torch.nn.Module:
        if path in self.extra_modules:
            return self.extra_modules[path]
        module = self.guard.tree().by_path.get(path)
        # (a `.source` point not made yet: made now, by rewriting the forwards it is in)
        return module if module is not None else submodule(self.root, path)

    def _remove_hooks(self) -> None:
        for handle in reversed(self.handles):
            handle.remove()
        self.handles.clear()

    def _count(self, path: str, kind: str) -> int:
        counter = self.calls.setdefault((path, kind), [0])
        call = counter[0]
        counter[0] = call + 1
        return call

    # the two hooks count calls inline: they run once per call of every hooked module, and each
    # Python call made inside them costs several times more there than in a loop (cold caches)
    def _pre_hook(self, path):
        counter, sources, owner = self.calls.setdefault((path, "input"), [0]), self.sources, self.owner

        def hook(module, args, kwargs):
            if self.bypass or get_ident() != owner:
                return None
            call = counter[0]
            counter[0] = call + 1
            if call >= self.deferred_from:
                self._plan_copies(call)
            key = (path, "input", call)
            if key not in sources:
                return None
            event = self._event(key, (args, kwargs))
            return event.value if event.changed else None

        return hook

    def _post_hook(self, path, kept, edits):
        """The hook of `path`'s output; `kept`, `edits`: its events of `Plan.kept` and `Plan.edits` (by call) it may
        do itself (see `_install`)."""
        # (few cells: each is made when this is called, once per hooked module per trace, on cold caches; the
        # rest is read from `self` in the call, once per module call as well)
        counter, owner = self.calls.setdefault((path, "output"), [0]), self.owner

        def hook(module, args, output):
            if self.bypass or get_ident() != owner:
                return None
            call = counter[0]
            counter[0] = call + 1
            if call >= self.deferred_from:
                self._plan_copies(call)
            indices = kept.get(call)
            if indices is None:
                edit = edits.get(call)
                if edit is None or self.ready or not self._edit(path, call, output, edit):
                    key = (path, "output", call)
                    if key not in self.sources:
                        return None
                    event = self._event(key, output)
                    return event.value if event.changed else None
                return None
            # an event of `Plan.kept`: what _event and _finish would do for module values nothing reads (no
            # reader to wake, nothing read to free), inline: the commonest event, a saved output (its entry in
            # `sources` stays, as an edit's does: a call comes once, and a delete costs ~1 µs on cold caches)
            if self.untrusted:
                self.guard.tick()
            done = self.done
            for index in indices:
                if not done[index]:
                    done[index] = 1
                    self.finished += 1
                    if index in self.saved:
                        self.values[index] = self.results[index] = output
            if self.early_stop and self.finished == self.total and not self.events:
                raise EarlyStop()
            return None

        return hook

    def _edit(self, path: str, call: int, output, edit) -> bool:
        """An event of `Plan.edits`, module value `output`: do its `x[k] op= c` or `x[k] = c` here, as the general
        path would do its nodes. False (nothing done) where it must go that way: the value is a weight's memory
        (see Guard.local_call), or a `session.stop()` ended some of its nodes. (`c` may be one: an in-place
        operator's schema and setitem's write their first argument only, so `c` is read, never written.)"""
        values, steps, where, operator, constant = edit
        done = self.done
        for index in values:  # (a loop, not any(...): a generator is made per call, on cold caches)
            if done[index]:
                return False
        if self.untrusted:
            if not self._checked_edit(path, call, output, edit):
                return False
        else:
            # (holds_no_weight's test and _onto_itself's, inline: this runs in a hook, where each call costs on
            # cold caches)
            strided = False
            if type(output) is torch.Tensor:
                pointer = output.untyped_storage().data_ptr()
                weights, named = self.weight_memory
                if pointer and (pointer in weights or pointer in named):
                    return False
                strided = output.layout is torch.strided
            elif not self.guard.holds_no_weight((output,)):
                return False
            at = steps[0]
            try:
                if operator is None:
                    output[where] = constant
                else:
                    view = output[where]
                    at = steps[1]
                    new = operator(view, constant)
                    at = steps[2]
                    if new is not view or not strided:
                        output[where] = new
            except Exception as error:
                if at != steps[0]:  # (the getitem's value: the error shows its operator's operands)
                    self.values[steps[0]] = view
                self._edit_failed(path, call, output, at, error)
        saved = self.saved
        for index in values:
            done[index] = 1
            if index in saved:
                self.values[index] = self.results[index] = output
        for index in steps:
            done[index] = 1
        self.finished += len(values) + len(steps)
        if self.early_stop and self.finished == self.total and not self.events:
            raise EarlyStop()
        return True

    def _checked_edit(self, path: str, call: int, output, edit) -> bool:
        """`_edit`'s nodes in an untrusted run: each gets the checks `_op_call` gives it (its size rule, counted in the
        run's budget, with the deadline checked first), under `initialized_memory`. False (nothing done) where they
        would need the write check, whose refusals the general path gives: the output or the constant is a weight's
        memory or has an autograd graph (`Guard.reaches_no_weight`, asked as of the operator, all of whose arguments
        are its operands)."""
        values, steps, where, operator, constant = edit
        guard, nodes = self.guard, self.nodes
        store = nodes[steps[-1]]
        if not guard.reaches_no_weight(_setitem, (output, where, constant)):
            return False
        at = steps[0]
        try:
            guard.tick()
            with initialized_memory:
                if operator is None:
                    guard.before_call(store.target, _setitem, (output, where, constant), {})
                    output[where] = constant
                else:
                    guard.before_call(nodes[at].target, _getitem, (output, where), {})
                    view = output[where]
                    at = steps[1]
                    guard.before_call(nodes[at].target, operator, (view, constant), {})
                    new = operator(view, constant)
                    at = steps[2]
                    if not _onto_itself(output, view, new):
                        guard.before_call(store.target, _setitem, (output, where, new), {})
                        output[where] = new
        except Exception as error:
            if at != steps[0]:  # (as in _edit)
                self.values[steps[0]] = view
            self._edit_failed(path, call, output, at, error)
        return True

    def _edit_failed(self, path: str, call: int, output, at: int, error: Exception) -> None:
        """Node `at` of an edit failed (in the hook, outside `_event`): as `_execute` fails a node, naming the event."""
        self.events.append(_Event((path, "output", call), output))
        try:
            failure = self._failure(at, error)
        finally:
            self.events.pop()
        self._node_failed(at, failure)

    def _failure(self, index: int, error: Exception) -> InterlaceError:
        """What node `index` raising `error` fails with: an interlace error (a check's: a size over the limits, the
        deadline) as it is, any other as the node's `ExecutionError`."""
        node = self.nodes[index]
        if isinstance(error, InterlaceError):
            return error if error.node is not None else error.at(node)
        failure = self._execution_error(node, error)
        failure.__cause__ = error
        return failure

    def _patch_forward(self, module, path) -> None:
        original = module.forward

        def forward(*args, **kwargs):
            if self.bypass or get_ident() != self.owner:
                return original(*args, **kwargs)
            call = self._count(path, "skip")
            index = self.plan.skips.get((path, call))
            if index is None:
                return original(*args, **kwargs)
            if not self.done[index]:
                self._node_failed(index, self._out_of_order(index, f"{path} (call {call}) runs"))
            if (path, call) not in self.skip_values:  # its job failed or stopped: the module runs
                return original(*args, **kwargs)
            value, rows = self.skip_values[(path, call)]
            if self.untrusted:  # (its output may well be larger than its input: an embedding's is)
                self.guard.check_size(value, f"the value that replaces {path}")
            if rows is None:
                return value
            return write_rows(original(*args, **kwargs), value, rows, self.batch_size, shared=self.shared,
                              batched=self._batched(path, "output"))

        # an instance forward may be someone else's (accelerate's hooks): put back exactly what was there
        self.handles.append(_InstanceAttribute(module, "forward"))
        module.forward = forward

    def _event(self, key, value, sources=None) -> _Event:
        """Module event `key` with its `value`: its nodes run (`sources`, some of them: the others' event comes
        later; by default all, and the event then ends: what still waits for it failed)."""
        if self.untrusted:
            self.guard.tick()
        event = _Event(key, value)
        self.events.append(event)
        try:
            whole = sources is None
            if whole:
                sources = self.sources.pop(key)
            done, waiting, ready = self.done, self.waiting, self.ready
            for index in sources:
                if done[index]:  # under a false cond: done before its event
                    continue
                if waiting[index]:  # guarded by a cond computed during this event
                    self.open_sources.add(index)
                elif len(sources) == 1 and not ready and self.rows is None and self._whole_output(index):
                    self._finish(index, value)  # (most events: one module's output read whole, nothing before it)
                else:
                    _push(ready, index)
            self._drain()
            for index in sources:
                if not done[index]:
                    self._ended_early(index, key)
            for index in self.plan.mutations.get(key, ()) if whole else ():
                if not done[index]:
                    self._ended_early(index, key)
        finally:
            self.events.pop()
        if self.early_stop and self.finished == self.total and not self.events:
            raise EarlyStop()
        return event

    def _whole_output(self, index: int) -> bool:
        """Whether node `index` is an output read as it is: what `_op_module_value` would give is the event's value."""
        node = self.nodes[index]
        return node.guard is None and node.kwargs["kind"] == "output"

    def _ended_early(self, index: int, key) -> None:
        self._node_failed(index, self._out_of_order(index, f"{key[0]}.{key[1]} (call {key[2]}) ends"))

    def _drain(self) -> None:
        ready, execute = self.ready, self._execute
        if ready and self.untrusted:
            with initialized_memory:  # (what an earlier job left in freed memory stays unread)
                while ready:
                    execute(_pop(ready))
            return
        while ready:
            execute(_pop(ready))

    def _execute(self, index: int) -> None:
        if self.done[index]:  # finished already (its job failed or stopped, in a merged run)
            return
        node = self.nodes[index]
        if self.untrusted:
            self.guard.tick()
        if node.guard is not None and not self.values.get(node.guard):
            self._finish(index, None, ran=False)  # a false (or skipped) cond: the node does not run
            return
        try:
            if index in self.plain_calls:  # most nodes: an allowed call, inline (a method call costs here)
                args, kwargs = node.bind(self.values)
                if index in self.stores_back and self._stores_onto_itself(index, args):
                    value = None
                else:
                    value = self.guard.local_call(FUNCTIONS[node.target][0], args, kwargs)
            elif node.op == "module_value":  # the other common node (one per hooked value)
                value = self._op_module_value(node)
            else:
                value = getattr(self, _METHODS[node.op])(node)
        except EarlyStop:
            raise
        except Exception as error:
            self._node_failed(index, self._failure(index, error))
            return
        if value is not _PENDING:
            self._finish(index, value)

    def _node_failed(self, index: int, error: InterlaceError) -> None:
        """Node `index` failed: the run fails (a merged run fails only that node's job: see merge.py)."""
        raise error

    def _finish(self, index: int, value, ran: bool = True, why: str = "its condition (tracer.cond) was false") -> None:
        values, saved = self.values, self.saved
        if ran:
            values[index] = value
            if index in saved:
                self.results[index] = value
        elif index in saved:
            self.not_run[index] = why
        self.done[index] = 1
        self.finished += 1
        waiting, nodes = self.waiting, self.nodes
        for user in self.users[index]:
            waiting[user] -= 1
            if not waiting[user]:
                node = nodes[user]
                if node.op != "module_value" or node.guard is not None and not values.get(node.guard):
                    _push(self.ready, user)  # (a module value under a false cond is done: no event needed)
                elif user in self.open_sources:
                    self.open_sources.discard(user)
                    _push(self.ready, user)
        # free inputs whose last reader has run
        remaining = self.remaining
        for ref in self.plan.reads[index]:
            remaining[ref] -= 1
            if not remaining[ref] and ref not in saved:
                values.pop(ref, None)
        if not remaining[index] and index not in saved:
            values.pop(index, None)

    def _arguments(self, node):
        """`(args, kwargs)` of a call, with values in place of references."""
        return node.bind(self.values)

    def _resolve(self, obj):
        return map_refs(obj, lambda ref: self.values[ref.index])

    # -- one method per op -----------------------------------------------------------------------
    def _op_module_value(self, node):
        event = self._find_event(node.index)
        value, at = event.value, ()
        kind = node.kwargs["kind"]
        if kind == "input":
            value, at = first_input(*value), first_input_place(*value)
        elif kind == "inputs":
            value = (tuple(value[0]), dict(value[1]))
        rows = self._rows(node.kwargs["invoke"])
        if rows is None:
            return value
        return narrow(value, rows, self.batch_size, shared=self.shared,
                      cuts=self.row_slices if node.index in self.grad_sources else None,
                      batched=self._batched(node.target, "output" if kind == "output" else "input"), at=at)

    def _op_parameter(self, node):
        try:
            weight = self.root.get_parameter(node.target)
        except AttributeError:
            weight = self.root.get_buffer(node.target)
        self.guard.named_weight(weight)
        return weight

    def _op_call(self, node):
        target = node.target
        fn = ops.resolve(target) if type(target) is str else target
        args, kwargs = self._arguments(node)
        if node.index in self.stores_back and self._stores_onto_itself(node.index, args):
            return None
        if node.index in self.plan.row_zero:
            # (a stranger's locations are never files to open here: formatting a warning reads its line)
            _warn_row_zero(self.nodes[node.args[0].index], args[0], None if self.untrusted else node)
        if self.untrusted:
            self.guard.before_call(target, fn, args, kwargs)
            result = self.guard.call(target, fn, args, kwargs)
            self.guard.check_value(result)
            return result
        return self.guard.local_call(fn, args, kwargs)  # (it keeps a weight an in-place operator writes)

    def _stores_onto_itself(self, index: int, args) -> bool:
        """Whether setitem `index` (of `x[k] += y`, see Plan.stores_back) would copy the view `x[k]` onto itself."""
        return _onto_itself(args[0], self.values[self.stores_back[index]], args[2])

    def _op_call_method(self, node):
        args, kwargs = self._arguments(node)
        if self.untrusted:
            self.guard.before_method(node.target, args, kwargs)
        elif node.index in self.plan.writes:
            self.guard.before_write(args[0], node)
        if node.target == "backward":  # writes only the run's own .grad (put back after it)
            return self._backward(node, args, kwargs)
        if not self.untrusted:
            try:
                method = getattr(args[0], node.target)
            except AttributeError:  # a misspelt method (a server refuses it before running, with the same hint)
                names = [name for name in dir(args[0]) if not name.startswith("_")]
                raise AttributeError(f"{type(args[0]).__name__} has no method {node.target!r}"
                                     f"{did_you_mean(node.target, names)}") from None
            return method(*args[1:], **kwargs)
        result = self.guard.call(f".{node.target}()", getattr(type(args[0]), node.target), args, kwargs)
        self.guard.check_value(result)
        return result

    def _op_apply(self, node):
        if self.untrusted:
            raise RefusedError("user functions (interlace.apply) do not run here; use allowed operations")
        return self._op_call(node)

    def _op_swap(self, node):
        target = self.nodes[node.args[0].index]
        new = self._resolve(node.args[1])
        event = self._find_event(target.index)
        if target.op == "module_value" and (difference := unlike(self.values.get(target.index), new, plain=True)):
            self.unlike.append(f"{target.describe()} was replaced ({self._where(node)}) by a value of {difference}: "
                               "the modules after it expect what it gave"
                               + ("" if isinstance(new, torch.Tensor) else
                                  " (to set the tensor's values instead, assign into it: `.output[:] = value`)"))
        if self.untrusted:
            self.guard.check_replacement(self.values.get(target.index, event.value), new, "the replacement value")
        if target.op == "grad":
            event.value = new
        else:
            rows, size, shared = self._rows(target.kwargs["invoke"]), self.batch_size, self.shared
            kind = target.kwargs["kind"]
            batched = self._batched(target.target, "output" if kind == "output" else "input")
            if kind == "output":
                event.value = new if rows is None else write_rows(event.value, new, rows, size, shared=shared,
                                                                  batched=batched)
            elif kind == "input":
                event.value = replace_first_input(event.value, new, rows, size, shared=shared, batched=batched)
            else:
                args, kwargs = new
                new = (tuple(args), dict(kwargs))
                event.value = new if rows is None else write_rows(event.value, new, rows, size, shared=shared,
                                                                  batched=batched)
        event.changed = True
        return None

    def _op_skip(self, node):
        rows = self._rows(node.kwargs["invoke"])
        value = self._resolve(node.args[0])
        self.skip_values[(node.target, node.kwargs["call"])] = (value, rows)
        if isinstance(value, torch.Tensor):  # (what the module would have given is not known: it does not run)
            self.unlike.append(f"{node.target} is skipped ({self._where(node)}) and gives a value of shape "
                               f"{list(value.shape)} in its place: the modules after it expect what it gives")
        return None

    def _op_module_call(self, node):
        module = self._module_at(node.target)
        args, kwargs = self._arguments(node)
        hooked = kwargs.pop("hook", False)  # hook=True: its modules' values can be read and changed
        outer, self.bypass = self.bypass, True
        try:
            if self.untrusted:
                weights = self.guard.before_module_call(module, node.target, args, kwargs)
            self.bypass = outer if hooked else True
            if self.untrusted:
                return self.guard.call_module(node.target, module, args, kwargs, weights)
            return self.guard.local_call(module, args, kwargs)  # (handed a weight, it writes a copy: see Guard)
        finally:
            self.bypass = outer

    def _op_grad(self, node):
        return _PENDING  # computed in the backward pass it belongs to (see _backward)

    def _backward(self, node, args, kwargs):
        """A backward call: the .grad nodes that are its (see Plan.gradients) are hooked during it only."""
        handles = []
        try:
            for index in self.plan.gradients.get(node.index, ()):
                if self.done[index]:  # under a false cond
                    continue
                grad = self.nodes[index]
                tensor = self.values[grad.args[0].index]
                if not isinstance(tensor, torch.Tensor) or not tensor.requires_grad:
                    raise InterlaceError(f"{self._where(grad)}: the value has no gradient: " + (
                        "gradients are off in this run (a generation runs without them, and so does code under "
                        "torch.no_grad()): take gradients in model.trace(...)" if not torch.is_grad_enabled() else
                        "it is not part of the autograd graph: nothing it was computed from requires a gradient (a "
                        "frozen model's parameters do not). Call .requires_grad_() on it in the trace, before the "
                        "modules that read it run: `h = layer.output; h.requires_grad_()`")).at(grad)
                base, rows = self._gradient_target(tensor)
                handles.append(base.register_hook(lambda g, index=index, rows=rows: self._grad_event(index, g, rows)))
            return args[0].backward(*args[1:], **kwargs)
        finally:
            for handle in handles:
                handle.remove()

    def _gradient_target(self, tensor):
        """(the tensor to hook, rows) for the gradient of `tensor`. An invoke's rows of a module's value are a
        view that the loss does not go through (the model goes on with the whole value), so autograd never
        computes the view's own gradient; the whole value's, cut to the rows, is the same. The whole value
        is kept when the rows are cut: it may itself be a view (GPT-2's Conv1D output), whose `_base` is
        another tensor."""
        cut = self.row_slices.get(id(tensor))
        if cut is not None and cut[0] is tensor:
            return cut[1], cut[2]
        return _row_slice(tensor)

    def _grad_event(self, index: int, grad, rows=None):
        """The gradient of a grad node's value has come; `rows`: the value is those rows of the tensor
        whose gradient this is (an invoke's part of the batch)."""
        if self.done[index]:
            return None
        mine = grad if rows is None else grad[rows[0] : rows[1]]
        event = _Event(("grad", index), mine)
        self.events.append(event)
        try:
            self._finish(index, mine)
            with torch.enable_grad():  # autograd turns it off in its hooks; later backwards need it
                self._drain()
        finally:
            self.events.pop()
        if not event.changed:
            return None
        if rows is None:
            return event.value
        whole = grad.clone()
        whole[rows[0] : rows[1]] = event.value
        return whole

    def _op_cond(self, node):
        return builtins.bool(self._resolve(node.args[0]))

    def _op_stop(self, node):
        if node.kwargs.get("session"):
            # session.stop(): the nodes up to the end of its loop do not run; what follows the loop does
            end = self.skip_to = node.kwargs.get("skip_to") or len(self.nodes)
            why = ended_by_session_stop(end == len(self.nodes))
            for index in range(node.index + 1, min(end, self.end)):
                if not self.done[index]:
                    self._finish(index, None, ran=False, why=why)
            return None
        self.stopped = True
        self._finish(node.index, None)
        raise EarlyStop()

    def _op_log(self, node):
        values = self._resolve(node.args)
        if self.untrusted:
            self.logs.append((node.index, values))
        else:
            print(*values)
        return None

    # -- helpers ---------------------------------------------------------------------------------
    def _batched(self, path: str, kind: str):
        """The places in the values of `path`'s calls ('input': their (args, kwargs)) that hold rows, as `narrow`
        takes them; None: every tensor whose first dimension has the batch's size (a merged run knows better)."""
        return None

    def _rows(self, invoke):
        if self.rows is None or invoke is None:
            return None
        return self.rows[invoke]

    def _find_event(self, index: int) -> _Event:
        key = self.plan.event_keys[index]
        for event in reversed(self.events):
            if event.key == key:
                return event
        raise self._out_of_order(index, "its module runs")

    def _where(self, node) -> str:
        return describe_location(node.location, read_source=not self.untrusted)

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
        needs = f" needs {source.describe()} (recorded at {self._where(source)})" if source else ""
        return OutOfOrderError(
            f"{self._where(node)}\n  {node.describe()}{needs}, which the model "
            f"has not computed yet when {moment}. The model computes modules in the order it "
            "calls them: read values from earlier modules, or use .next() for a later call."
        ).at(node)

    def _execution_error(self, node, error: Exception) -> ExecutionError:
        waiting = f" in the hook of {self._event_name()}" if self.events else ""
        backward = node.op == "call_method" and node.target == "backward"  # (autograd's errors say what to do)
        shapes = isinstance(error, (IndexError, RuntimeError)) and not backward
        return ExecutionError(
            f"{self._where(node)}\n  {type(error).__name__}: {error}\n"
            f"  while running {node.describe()}{self._operands(node) if shapes else ''}{waiting}."
            + (" Check the shapes and indices on that line." if shapes else "")
        ).at(node)

    def _operands(self, node) -> str:
        """` on (...)`: what node's call was handed, tensors by shape (an index error's message names a dimension
        of torch's own view, not the user's: the shapes say which); empty where a value is gone."""
        event = self.events[-1] if self.events else None

        def value(ref):
            if ref.index in self.values:
                return self.values[ref.index]
            # (an edit's hook hands its module value straight to it: the event's value)
            if event is not None and self.nodes[ref.index].op == "module_value" and \
                    self.plan.event_keys[ref.index] == event.key:
                return event.value
            raise LookupError(ref.index)

        try:
            args = map_refs(node.args, value)
        except LookupError:
            return ""
        return f" on ({', '.join(_shown(arg) for arg in args)})"

    def _event_name(self) -> str:
        key = self.events[-1].key
        if key[0] == "grad":
            return f"the gradient of node %{key[1]}"
        return f"{key[0] or '<root>'} ({key[1]}, call {key[2]})"

    def _model_error(self, error: Exception) -> ModelError:
        pending = next((n for n in self.nodes[self.start : self.end] if not self.done[n.index]), None)
        waiting = ""
        if pending is not None:
            source = self._pending_source(pending.index) or pending
            waiting = f" The graph was waiting for {source.describe()} ({self._where(source)})."
        unlike_ = "".join(f" {text}." for text in self.unlike)
        return ModelError(f"the model raised {type(error).__name__}: {error}.{unlike_}{waiting}")

    def _check_finished(self) -> None:
        """Fail the nodes that did not run (the run ended with some not finished, and no stop)."""
        checked: set[int] = set()  # sources already found optional: each is looked at once
        deferred = self.plan.deferred  # copies never planned: of steps the generation did not reach (none ran)
        nodes = self.nodes[self.start : self.end] if not deferred else (
            self.nodes[self.start : deferred[0][1]] + self.nodes[deferred[-1][2] : self.end])
        for pending in nodes:
            if self.done[pending.index]:
                continue
            source = self._pending_source(pending.index) or pending
            if source.index in checked:
                continue
            checked.add(source.index)
            if source.op == "module_value" and (
                source.kwargs.get("optional") or not self.strict and source.kwargs["call"] > 0
            ):
                continue  # a cached module that did not run, or a step generation never reached
            error = OutOfOrderError(f"{self._where(pending)}\n  {self._never_ran(source)}.")
            self._node_failed(pending.index, error.at(pending))

    def _never_ran(self, source) -> str:
        if source.op == "grad":
            return ("its gradient was never computed: read .grad before the .backward() that computes it (on a "
                    "loss, inside the trace, after this line)")
        if source.op == "module_value":
            path = source.target
            ran = self.calls.get((path, "output" if source.kwargs["kind"] == "output" else "input"), (0,))[0]
            skipped = next((outer for outer, _ in self.plan.skips if path.startswith(f"{outer}.") or not outer), None)
            if not ran and skipped is not None:
                return (f"{source.describe()} was never reached: {skipped or 'the model'} is skipped (.skip()), so "
                        "the modules inside it do not run; read the skipped module's own output instead")
            called = not ran and next((node for node in self.nodes[self.start : self.end] if node.op == "module_call"
                                       and not node.kwargs.get("hook")
                                       and (path == node.target or path.startswith(f"{node.target}."))), None)
            if called:
                return (f"{source.describe()} was never reached: {called.target} was called in this trace without "
                        f"hook=True ({self._where(called)}), which runs it as a plain function; call it with "
                        "hook=True to read or change the values inside it")
            if not ran and ".source." in path:
                return self._call_site_never_made(source, path.rpartition(".source.")[0])
            if not ran and path:  # a submodule kept for its attributes (GPT-2's attn_dropout: only its .p is read)
                parent = path.rpartition(".")[0] or "the model"
                return (f"{source.describe()} was never reached: {path} did not run at all in this run. The forward "
                        f"of {parent} may not call it: print the `.source` of {parent} to see the calls its forward "
                        "makes, and read or change one of those (`.source.<name>.output`)")
            return (
                f"{source.describe()} was never reached: {path or 'the model'} ran {ran} time(s) in "
                "this run. Check the call index (.next(), at_call) or whether the module runs at all"
            )
        return f"{source.describe()} never ran"

    def _call_site_never_made(self, source, owner: str) -> str:
        """Why a `.source` point of `owner` (a module or an outer point) did not run, and what to do."""
        text = (f"{source.describe()} was never reached: the forward of {owner} did not make that call in this run; "
                f"print the `.source` of {owner} to see its calls and the branches that make them")
        try:
            outer = submodule(self.root, owner)
        except InterlaceError:
            return text
        if isinstance(outer, Point):
            called = outer.bypassed
            if called is None or outer._inner is None:
                return text
            said = (f"{owner} last called {_name(called)}, not {_name(outer._inner[0])}, whose code its "
                    "`.source` shows")
        else:
            forward = outer.forward
            if getattr(forward, "__wrapped__", None) is None:
                return text
            said = (f"Its forward is wrapped ({_name(forward)}), and the wrapper may run another implementation than "
                    "the code `.source` shows")
        return (f"{text}. {said}: transformers picks one when the model runs (for experts, attention). Choose the "
                "plain Python one to read inside it, e.g. `config._experts_implementation = \"eager\"` or "
                "`attn_implementation=\"eager\"` when loading")


def _name(function) -> str:
    return getattr(function, "__qualname__", None) or repr(function)


def _shown(value, depth: int = 0) -> str:
    """A short text of an operand: a tensor by its shape and dtype (a small integer one, an index, by its values
    too), a slice as written, containers item by item, a plain value by its repr, anything else by its type."""
    if isinstance(value, torch.Tensor):
        text = summary(value)
        if not value.is_floating_point() and value.numel() <= 8 and value.device.type != "meta":
            text += f" = {value.tolist()}"
        return text
    if isinstance(value, slice):
        text = ":".join("" if part is None else str(part) for part in (value.start, value.stop))
        return text + (f":{value.step}" if value.step is not None else "")
    if isinstance(value, (tuple, list)) and depth < 2:
        items = ", ".join(_shown(item, depth + 1) for item in value[:6]) + (", ..." if len(value) > 6 else "")
        return f"({items})" if isinstance(value, tuple) else f"[{items}]"
    if value is None or isinstance(value, (bool, int, float, complex, str)):
        text = repr(value[:31] if isinstance(value, str) else value)  # (a stranger's long string is not copied whole)
        return text if len(text) <= 30 else text[:27] + "..."
    return type(value).__name__


def _onto_itself(tensor, view, new) -> bool:
    """Whether `tensor[k] = new`, after `view = tensor[k]` with a basic index `k` and `new = view op= y`, would copy
    memory onto itself: the in-place operator returned the view itself, and a basic index of a plain strided
    tensor is always a view of its memory, so the operator wrote `tensor` through it."""
    return new is view and type(tensor) is torch.Tensor and tensor.layout is torch.strided


def _only_recorders(module: torch.nn.Module) -> bool:
    """Whether every forward hook on `module` is one of the hooks transformers leaves on a model (after the
    first call asking for `output_hidden_states` / `output_attentions`) to record those outputs: ours then
    go first, so that what it records is the output the trace wrote, which the next module gets."""
    hooks = module._forward_hooks.values()
    return bool(hooks) and all(getattr(hook, "__module__", None) == "transformers.utils.output_capturing"
                               for hook in hooks)


def ended_by_session_stop(whole: bool) -> str:
    """Why a saved value has none: a `session.stop()` ended the `whole` session, or else its loop, first."""
    return f"session.stop() ended {'the session' if whole else 'its loop'} before it ran"


class BatchIndexWarning(UserWarning):
    """`module.output[0]` on a batch-first tensor: in transformers 5 that is batch row 0, not a tuple item."""


_warned_paths: set[str] = set()


def unlike(old, new, *, plain: bool = False) -> str | None:
    """How a tensor that replaces a module's tensor differs from it in shape or dtype (None: it does not).

    plain: also describe a value that is no tensor (`output = 0`), or a tensor where a tuple was (an attention's
    output), which the modules after it may take (`residual + 0`) or not: said only where the model then failed."""
    if plain and isinstance(old, torch.Tensor) and not isinstance(new, torch.Tensor):
        return f"type {type(new).__name__} ({_shown(new)}) where it gave a tensor of shape {list(old.shape)}"
    if plain and type(old) is tuple and isinstance(new, torch.Tensor):
        return (f"type Tensor (shape {list(new.shape)}) where it gave a tuple of {len(old)} (to replace one of its "
                "items, assign into that item: `.output[0][:] = value`)")
    if not (isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor)):
        return None
    if old.shape != new.shape:
        return f"shape {list(new.shape)} where it gave {list(old.shape)}"
    if old.dtype != new.dtype:
        return f"dtype {new.dtype} where it gave {old.dtype} (cast it: value.to({old.dtype}))"
    return None


def _warn_row_zero(source, value, node) -> None:
    """Warn once per module path when `output[0]` takes the first row of a batch-first tensor; the warning is
    the user's line's (that of `node`, the index, where given), so filters and `-W error` can name it."""
    path = source.target
    if path in _warned_paths or not isinstance(value, torch.Tensor) or value.dim() < 3:
        return
    _warned_paths.add(path)
    location = node.location if node is not None else None  # (worked out only for a warning given)
    message = (
        f"{path or 'the model'}.output is a tensor of shape {tuple(value.shape)}, so `.output[0]` is its "
        "first row (batch item 0), not the hidden states. In transformers 5 decoder layers return the "
        "hidden states themselves, where older releases (and older nnsight examples) returned a tuple. "
        "Use `.output` (or `.output[:, ...]`) for the hidden states; if row 0 is what you want, silence "
        "this with warnings.filterwarnings('ignore', category=interlace.BatchIndexWarning).")
    if location:
        warnings.warn_explicit(message, BatchIndexWarning, *location)
    else:
        warnings.warn(message, BatchIndexWarning, stacklevel=2)


def _gradient_sources(nodes, gradients: dict[int, list[int]]) -> set[int]:
    """The module values that .grad nodes ask the gradient of, directly or through indexing (`attn.output[0]`)."""
    sources = set()
    for grads in gradients.values():
        for index in grads:
            node = nodes[nodes[index].args[0].index]
            while node.op == "call" and node.target == "operator.getitem" and isinstance(node.args[0], Ref):
                node = nodes[node.args[0].index]
            if node.op == "module_value":
                sources.add(node.index)
    return sources


def _row_slice(tensor: torch.Tensor):
    """(the tensor to hook, rows) for a gradient of a slice of rows taken in the trace: its base's, cut to
    the rows, when it is a row slice of that base. Else (tensor, None)."""
    base = tensor._base
    if (base is not None and base.requires_grad and tensor.dim() and tensor.shape[1:] == base.shape[1:]
            and tensor.stride() == base.stride()):
        start, extra = divmod(tensor.storage_offset() - base.storage_offset(), base.stride(0) or 1)
        if not extra and 0 <= start and start + tensor.shape[0] <= base.shape[0]:
            return base, (start, start + tensor.shape[0])
    return tensor, None


def _restore_grads(grads) -> None:
    for param, grad in grads.items():
        param.grad = grad


class _InstanceAttribute:
    """A handle that puts an instance attribute back as it was (or removes it) on `remove()`."""

    def __init__(self, obj, name):
        self.obj, self.name = obj, name
        self.before = obj.__dict__.get(name, _MISSING)

    def remove(self) -> None:
        if self.before is _MISSING:
            self.obj.__dict__.pop(self.name, None)
        else:
            self.obj.__dict__[self.name] = self.before
