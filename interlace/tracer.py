"""The context managers that record: `Tracer` (a `with model.trace(...)` block) and `Invoker`.

While a tracer is open, envoys and proxies append nodes to its graph. When the block ends the
tracer hands the graph to its model to execute, then binds every saved value: the proxies' `.value`,
and the names in the caller's scope (and inside lists, dicts and tuples there) that held saved
proxies now hold the real values.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

from . import ops
from .errors import InterlaceError, NotSavedError
from .graph import Graph, Ref, Request, TraceSpec, map_refs
from .proxy import Proxy

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_SKIPPED_DIRS = (_PACKAGE_DIR, _TORCH_DIR)

_PLAIN = frozenset({int, float, bool, str, type(None)})  # values that can hold no proxy

_active: list["Tracer"] = []  # open tracers, innermost last (for interlace.apply and friends)


def current() -> "Tracer":
    """The innermost open tracer; an error when called outside a trace."""
    if not _active:
        raise InterlaceError("this works only inside `with model.trace(...)`")
    return _active[-1]


def user_location():
    """(filename, lineno) of the nearest frame outside interlace and torch."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_SKIPPED_DIRS):
        frame = frame.f_back
    return (frame.f_code.co_filename, frame.f_lineno) if frame is not None else None


class Tracer:
    """Records a graph for one batched run of `model` and executes it when the block ends.

    >>> import torch, interlace
    >>> net = interlace.Model(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    >>> with net.trace() as tracer:
    ...     with tracer.invoke(torch.ones(1, 2)):
    ...         a = net[0].output.save()
    ...     with tracer.invoke(torch.zeros(1, 2)):
    ...         b = net[0].output.save()
    >>> torch.equal(b[0], net[0].bias.detach())
    True
    """

    def __init__(self, model, args: tuple = (), input_kwargs: dict | None = None, **options):
        self.model = model
        self.session: Session | None = model._session
        # in a session every trace records into the session's one graph
        self.graph = self.session.graph if self.session is not None else Graph()
        self.start = len(self.graph)
        replay(self.graph, model._edits)  # persistent interventions from model.edit()
        self.results: dict[int, object] = {}
        self.missing: dict[int, str] = {}  # saved nodes that have no value: why
        self.job = None  # remote=True, blocking=False: the job handle (values bind on job.result())
        self.scanner = None  # set by the model when scanning: evaluates nodes on fake tensors
        self._caches: list[dict] = []
        self.invokes: list[tuple[tuple, dict]] = []
        self.options = options
        self.current_invoke: int | None = None
        self._guard: int | None = None
        self._offsets: dict[str, int] = {}
        self._closed = False
        self._in_invoke = False
        self._step = 0  # the generation step an iteration block is recording
        self._iterating = False
        self._location = None
        if args or input_kwargs:
            self.invokes.append((args, input_kwargs or {}))
            self.current_invoke = 0

    # -- recording ----------------------------------------------------------------------------
    def record(self, op: str, target=None, args=(), kwargs=None) -> Proxy:
        """Append a node and return the proxy of its value."""
        if self._closed:
            active = self.model._tracer
            if active is not None and active.graph is self.graph:  # a later trace of a session
                return active.record(op, target, args, kwargs)
            return self._eager(op, target, args, kwargs or {})
        node = self.graph.add(
            op, target, self._to_refs(args), self._to_refs(kwargs) if kwargs else {},
            user_location(), self._guard,
        )
        if self.scanner is not None:
            self.scanner.evaluate(node)
        return Proxy(self, node.index)

    def _to_refs(self, obj):
        kind = type(obj)
        if kind in _PLAIN:
            return obj
        if isinstance(obj, Proxy):
            if obj._tracer.graph is self.graph:
                return Ref(obj._index)
            return obj.value  # a saved value of an earlier trace
        if kind is tuple or kind is list:
            return kind([self._to_refs(item) for item in obj])
        if kind is dict:
            return {key: self._to_refs(item) for key, item in obj.items()}
        if kind is slice:
            return slice(*self._to_refs((obj.start, obj.stop, obj.step)))
        return obj

    def _eager(self, op, target, args, kwargs):
        """A saved proxy used after its trace behaves like its value."""
        if op not in ("call", "call_method"):
            raise NotSavedError(
                "this trace has ended: record interventions inside the `with` block. "
                "Values from it are available only when saved with .save()."
            )
        args, kwargs = _values((args, kwargs))
        if op == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        return (ops.resolve(target) if isinstance(target, str) else target)(*args, **kwargs)

    def mark_saved(self, proxy: Proxy) -> None:
        """`proxy.save()`: keep the value of its node after the run."""
        active = self.model._tracer
        if self._closed and (active is None or active.graph is not self.graph):
            raise NotSavedError(
                "this trace has ended: call .save() inside the `with` block that computes the value"
            )
        self.graph.nodes[proxy._index].saved = True

    def call_index(self, envoy) -> int:
        return envoy._call + self._offsets.get(envoy._path, 0) + self._step

    def module_value(self, envoy, kind: str) -> Proxy:
        kwargs = {"kind": kind, "call": self.call_index(envoy), "invoke": self.current_invoke}
        return self.record("module_value", envoy._path, (), kwargs)

    def advance(self, path: str, steps: int) -> None:
        self._offsets[path] = self._offsets.get(path, 0) + steps

    # -- user-facing verbs ------------------------------------------------------------------------
    def invoke(self, *args, scan: bool = False, validate: bool = False, **kwargs) -> "Invoker":
        """Add an input to the batch; what is recorded inside sees and changes only its rows.

        scan / validate: check this invoke's lines on fake tensors (as `trace(..., scan=True)`).
        """
        return Invoker(self, args, kwargs, scan=scan or validate)

    def cond(self, predicate) -> "Condition":
        """`with tracer.cond(pred):` runs the block's interventions only when `pred` is true."""
        return Condition(self, self.record("cond", None, (predicate,)))

    @property
    def iter(self) -> "_Steps":
        """`with tracer.iter[1:3] as step:` applies the block to those generation steps."""
        return _Steps(self)

    def all(self) -> "Iteration":
        """`with tracer.all():` applies the block to every generation step."""
        return self.iter[:]

    def cache(self, modules=None, *, kind: str = "output") -> dict:
        """Save the output (or `kind="input"`) of every module, or of the chosen ones.

        modules: envoys or module paths; default every module but the root. Returns a dict keyed
        by module path that holds the real values after the trace; modules that did not run are
        left out.
        """
        if modules is None:
            envoys = [envoy for envoy in self.model.modules() if envoy.path]
        else:
            envoys = [self.model.get(m) if isinstance(m, str) else m for m in modules]
        cached = {}
        for envoy in envoys:
            kwargs = {"kind": kind, "call": self.call_index(envoy), "invoke": self.current_invoke, "optional": True}
            cached[envoy.path] = self.record("module_value", envoy.path, (), kwargs).save()
        self._caches.append(cached)
        return cached

    def stop(self) -> None:
        """End the model's forward pass once the graph reaches this point."""
        self.record("stop")

    def log(self, *values) -> None:
        """Print the values when the graph runs (real values, not proxies)."""
        self.record("log", None, values)

    def apply(self, fn, *args, **kwargs) -> Proxy:
        """Run `fn` on the real values of `args` when the graph runs; returns its traced result."""
        name = ops.name_of(fn)  # an allowed operation is an ordinary call, which can travel as data
        return self.record("call", name, args, kwargs) if name else self.record("apply", fn, args, kwargs)

    # -- context ----------------------------------------------------------------------------------
    def __enter__(self) -> "Tracer":
        self._location = user_location()
        self.model._attach(self)
        _active.append(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        _active.remove(self)
        self.model._detach(self)
        self._closed = True
        if exc_type is not None:
            if self.session is not None:
                del self.graph.nodes[self.start :]
            return False
        if self.session is not None:
            self.session.traces.append(self)  # runs when the session ends
            return False
        outcome = self.model.submit(Request(self.graph, [self.spec(len(self.graph))]), self.options)
        if _pending(self.options):  # a remote job: values bind when `tracer.job.result()` is read
            self.job = outcome.on_result(self._receive)
        else:
            self._receive(outcome, sys._getframe(1))
        return False

    def _receive(self, outcome, frame) -> None:
        self.results, self.missing = outcome.results, outcome.missing
        self._bind(frame)

    def spec(self, end: int) -> TraceSpec:
        """This trace as a part of a request: its nodes, inputs and run options."""
        options = {key: self.options[key] for key in ("mode", "kwargs", "early_stop") if key in self.options}
        return TraceSpec(self.start, end, self.invokes, options)

    def _bind(self, frame) -> None:
        """Give saved values to proxies, caches and the names in `frame` that held proxies."""
        for cached in self._caches:
            _bound(cached, self, 1)
            for path in [p for p, v in cached.items() if isinstance(v, Proxy)]:
                del cached[path]  # that module did not run
        if self.results:
            _bind_saved(frame, self)


class Session:
    """Several traces recorded into one graph and run together when the block ends.

    Values of an earlier trace can be used in a later one; remotely the session is one request.

    >>> import torch, interlace
    >>> net = interlace.Model(torch.nn.Linear(2, 2))
    >>> with net.session():
    ...     with net.trace(torch.ones(1, 2)):
    ...         first = net.output
    ...     with net.trace(torch.zeros(1, 2)):
    ...         net.output = first * 2
    ...         doubled = net.output.save()
    >>> torch.allclose(doubled, 2 * net.module(torch.ones(1, 2)))
    True
    """

    def __init__(self, model, **options):
        self.model = model
        self.options = options  # scan (for every trace inside), remote, blocking, timeout, backend
        self.graph = Graph()
        self.traces: list[Tracer] = []
        self.results: dict[int, object] = {}
        self.job = None  # remote=True, blocking=False: the job handle (values bind on job.result())

    def __enter__(self) -> "Session":
        if self.model._session is not None:
            raise InterlaceError("sessions cannot be nested")
        self.model._session = self
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.model._session = None
        try:
            if exc_type is None:
                self._run(sys._getframe(1))
        finally:
            self.traces.clear()  # tracers point back at the session: no cycle may keep values alive
        return False

    def _run(self, frame) -> None:
        traces = self.traces
        ends = [t.start for t in traces[1:]] + [len(self.graph)]
        outcome = self.model.submit(Request(self.graph, [t.spec(end) for t, end in zip(traces, ends)]), self.options)
        if _pending(self.options):  # a remote job: values bind when `session.job.result()` is read
            kept = list(traces)  # self.traces is cleared when the block ends
            self.job = outcome.on_result(lambda outcome, frame: self._receive(outcome, frame, kept))
        else:
            self._receive(outcome, frame, traces)

    def _receive(self, outcome, frame, traces) -> None:
        self.results = outcome.results
        for tracer in traces:
            tracer._receive(outcome, frame)


class Editor(Tracer):
    """`with model.edit() as edited:` records interventions that apply to every later trace."""

    def __enter__(self):
        super().__enter__()
        self.edited = self.model if self.options["inplace"] else self.model._copy()
        return self.edited

    def __exit__(self, exc_type, exc, tb) -> bool:
        _active.remove(self)
        self.model._detach(self)
        self._closed = True
        if exc_type is None:
            self.edited._edits = list(self.graph.nodes)
        return False


def _pending(options: dict) -> bool:
    """Whether a submission returns a job handle (remote, blocking=False) rather than its outcome."""
    return bool(options.get("remote")) and not options.get("blocking", True)


def replay(graph: Graph, nodes) -> None:
    """Append copies of `nodes` (a graph of their own, numbered from 0) to `graph`, refs moved along."""
    offset = len(graph)

    def moved(ref):
        return Ref(ref.index + offset)

    for node in nodes:
        guard = None if node.guard is None else node.guard + offset
        graph.add(node.op, node.target, map_refs(node.args, moved), map_refs(node.kwargs, moved),
                  node.location, guard, node.saved)


class Condition:
    """The block of a `tracer.cond(...)`: nodes recorded inside are guarded by the cond node."""

    def __init__(self, tracer: Tracer, node: Proxy):
        self.tracer, self.node = tracer, node

    def __enter__(self) -> Proxy:
        self.outer, self.tracer._guard = self.tracer._guard, self.node._index
        return self.node

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.tracer._guard = self.outer
        return False


class Invoker:
    """One input of a batched trace (`with tracer.invoke(x):`)."""

    def __init__(self, tracer: Tracer, args: tuple, kwargs: dict, *, scan: bool = False):
        self.tracer = tracer
        self.args, self.kwargs = args, kwargs
        self.scan = scan
        self.index: int | None = None

    def __enter__(self) -> "Invoker":
        tracer = self.tracer
        if tracer._in_invoke:
            raise InterlaceError("invokes cannot be nested: close one `tracer.invoke` before opening the next")
        self._outer = (tracer.current_invoke, tracer._offsets)
        tracer.invokes.append((self.args, self.kwargs))
        self.index = len(tracer.invokes) - 1
        tracer.current_invoke, tracer._offsets = self.index, {}
        tracer._in_invoke = True
        if self.scan and tracer.scanner is None:
            tracer.model._start_scan(tracer)  # captures every invoke so far, this one included
        elif tracer.scanner is not None:
            tracer.model._scan_invoke(tracer, self.index)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.tracer.current_invoke, self.tracer._offsets = self._outer
        self.tracer._in_invoke = False
        return False


class _Steps:
    def __init__(self, tracer: Tracer):
        self.tracer = tracer

    def __getitem__(self, key) -> "Iteration":
        steps = range(self.tracer.options.get("steps", 1))
        if isinstance(key, int):
            key = slice(key, key + 1 if key != -1 else None)
        if not isinstance(key, slice):
            raise InterlaceError(f"tracer.iter takes a step or a slice of steps, not {type(key).__name__}")
        chosen = steps[key]
        if not chosen:
            raise InterlaceError(f"tracer.iter[{key.start}:{key.stop}] selects no step of {len(steps)}")
        return Iteration(self.tracer, chosen)


class Iteration:
    """A block recorded once and applied to several generation steps.

    The block's nodes are recorded for the first step, then copied for each later step with every
    module call index moved by the step distance, so the graph stays plain data. The value bound by
    `as` is the step number; `interlace.list()` collects one entry per step.
    """

    def __init__(self, tracer: Tracer, steps: range):
        self.tracer, self.steps = tracer, steps

    def __enter__(self) -> Proxy:
        tracer = self.tracer
        if tracer._iterating:
            raise InterlaceError("iteration blocks cannot be nested")
        tracer._iterating = True
        self.start = len(tracer.graph)
        step = tracer.record("call", "builtins.int", (self.steps[0],))
        tracer._step = self.steps[0]
        return step

    def __exit__(self, exc_type, exc, tb) -> bool:
        tracer = self.tracer
        tracer._step, tracer._iterating = 0, False
        if exc_type is not None:
            return False
        graph, start = tracer.graph, self.start
        template = graph.nodes[start:]
        for step in self.steps[1:]:
            shift, offset = step - self.steps[0], len(graph) - start

            def moved(ref, offset=offset):
                return Ref(ref.index + offset) if ref.index >= start else ref

            for node in template:
                kwargs = map_refs(node.kwargs, moved)
                if node.op in ("module_value", "skip"):
                    kwargs["call"] += shift
                args = (step,) if node.index == start else map_refs(node.args, moved)
                guard = node.guard + offset if node.guard is not None and node.guard >= start else node.guard
                graph.add(node.op, node.target, args, kwargs, node.location, guard, node.saved)
        return False


def _values(obj):
    """Replace saved proxies by their values, through containers."""
    if isinstance(obj, Proxy):
        return obj.value
    kind = type(obj)
    if kind is tuple or kind is list:
        return kind([_values(item) for item in obj])
    if kind is dict:
        return {key: _values(item) for key, item in obj.items()}
    return obj


_MISSING = object()
# Containers longer than this are not searched for saved proxies when binding names (that would
# cost time on every trace); proxies in them still work and give their value through `.value`.
_LARGEST_SCANNED = 1024


def _bound(obj, tracer: Tracer, depth: int):
    """`obj` with this tracer's saved proxies replaced by values; lists and dicts change in place."""
    if isinstance(obj, Proxy):
        if obj._tracer is tracer:
            value = tracer.results.get(obj._index, _MISSING)
            return obj if value is _MISSING else value
        return obj
    kind = type(obj)
    if depth == 0 or kind not in (list, dict, tuple) or len(obj) > _LARGEST_SCANNED:
        return obj
    if kind is list:
        for i, item in enumerate(obj):
            new = _bound(item, tracer, depth - 1)
            if new is not item:
                obj[i] = new
    elif kind is dict:
        for key, item in obj.items():
            new = _bound(item, tracer, depth - 1)
            if new is not item:
                obj[key] = new
    elif kind is tuple:
        items = [_bound(item, tracer, depth - 1) for item in obj]
        if any(new is not old for new, old in zip(items, obj)):
            return tuple(items)
    return obj


def _bind_saved(frame, tracer: Tracer) -> None:
    """Rebind the names in `frame` that hold saved proxies to their values.

    A proxy cannot turn into a tensor, so the caller's variables are updated instead. Module and
    class scopes are plain dicts; function locals need PyFrame_LocalsToFast before Python 3.13
    (from 3.13 on, `f_locals` writes through).
    """
    scope = frame.f_locals
    changed = False
    for name, obj in list(scope.items()):
        new = _bound(obj, tracer, 3)
        if new is not obj:
            scope[name] = new
            changed = True
    if changed and scope is not frame.f_globals and sys.version_info < (3, 13):
        ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))
