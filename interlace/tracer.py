"""What records: `Recorder` (shared by traces and sessions), `Tracer` (a `with model.trace(...)`
block), `Invoker` (one input of a batched trace) and `Editor` (`with model.edit():`).

While a tracer is open, envoys and proxies append nodes to its graph. When the block ends the
tracer hands its request (the graph, its inputs and options) to the model, which runs it here or on
a server, then binds every saved value: the proxies' `.value`, and the names in the caller's scope
that held saved proxies now hold the real values (`binding`).
"""

from __future__ import annotations

import os
import sys
import threading
import warnings

import torch

from . import collector, ops
from .binding import LARGEST_SCANNED, bind_saved, bound, values_of
from .blocks import Condition, Iteration, Steps
from .errors import InterlaceError, NotSavedError, describe_location
from .graph import Graph, Node, Ref, Request, StoreBack, TraceSpec, basic_index, item_updated, unique_refs
from .proxy import Proxy
from .stream import Stream

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_SKIPPED_DIRS = (_PACKAGE_DIR, _TORCH_DIR)

# values that can hold no proxy (tensors included: they are passed over on every recorded node)
_PLAIN = frozenset({int, float, bool, str, type(None), type(Ellipsis), torch.Tensor, torch.nn.Parameter,
                    torch.dtype, torch.device})

class _Open(threading.local):
    """This thread's open traces and sessions, innermost last (for interlace.apply and friends): another
    thread's trace is not this one's."""

    def __init__(self):
        self.recorders: list["Recorder"] = []


_open = _Open()


def active() -> list["Recorder"]:
    """The open traces and sessions of the calling thread, innermost last."""
    return _open.recorders


def current() -> "Recorder":
    """The innermost open trace or session of this thread; an error when called outside both."""
    recorders = _open.recorders
    if not recorders:
        raise InterlaceError("this works only inside `with model.trace(...)` (or `model.session()`)")
    return recorders[-1]


_inside: dict[str, bool] = {}  # file name -> whether it is interlace's or torch's (asked once per file)


def user_location(depth: int = 2):
    """Where the nearest frame outside interlace and torch is, from the caller's caller up (or from `depth` frames
    up, where the caller knows that those below are interlace's): `(code, offset of its current instruction)`,
    which `Node.location` turns into (filename, lineno) when asked (see there)."""
    frame = sys._getframe(depth)
    while frame is not None:
        code = frame.f_code
        inside = _inside.get(code.co_filename)
        if inside is None:
            inside = _inside[code.co_filename] = code.co_filename.startswith(_SKIPPED_DIRS)
        if not inside:
            return (code, frame.f_lasti)
        frame = frame.f_back
    return None


class Recorder:
    """Appends nodes to a graph and hands out proxies; the part traces and sessions share."""

    graph: Graph
    scanner = None  # set by the model when scanning: evaluates nodes on fake tensors

    def __init__(self, model):
        self.model = model
        self.results: dict[int, object] = {}
        self.missing: dict[int, str] = {}  # saved nodes that have no value: why
        self.job = None  # remote=True, blocking=False: the job handle (values bind on job.result())
        self._guard: int | None = None
        self._basic_item: Node | None = None  # the last getitem node recorded with a basic index (`item`, `store`)
        self._step_block: Iteration | None = None  # the block over steps being recorded
        self._closed = False

    def _recorder(self) -> "Recorder | None":
        """Where a node recorded through this recorder's proxies goes now (None: nowhere, run eagerly)."""
        return None if self._closed else self

    def record(self, op: str, target=None, args=(), kwargs=None) -> Proxy:
        """Append a node and return the proxy of its value."""
        recorder = self if not self._closed else self._recorder()
        if recorder is None:
            return self._eager(op, target, args, kwargs or {})
        if recorder is not self:
            return recorder.record(op, target, args, kwargs)
        # the arguments with proxies made Refs, and the nodes they read, found on the way (the plan asks for
        # them: see Node.refs); the commonest argument, a proxy of this graph, is made one here without a call
        graph, found, items, nested = self.graph, [], None, False
        for position, item in enumerate(args):
            kind = type(item)
            if kind in _PLAIN:
                continue
            if kind is Proxy and item._tracer.graph is graph:
                new = Ref(item._index)
                found.append(new.index)
            else:
                count = len(found)
                new = self._to_refs(item, found)
                nested = nested or len(found) > count
            if new is not item:
                if items is None:
                    items = list(args)
                items[position] = new
        if items is not None:
            args = tuple(items)
        if kwargs:
            kwargs = self._to_refs(kwargs, found)
            nested = True  # (binds the general way, as does a Ref inside an argument)
        else:
            kwargs = {}
        guard = self._guard
        if self._step_block is not None and guard == self._step_block.outer:
            guard = self._guard_in_step(op, found)
        nodes = graph.nodes  # (Graph.add, inline here and in module_value: one call fewer a node)
        index = len(nodes)
        node = Node(index, op, target, args, kwargs, user_location(), guard, False,
                    tuple(found) if guard is None and len(found) < 2 else unique_refs(found, guard), not nested)
        nodes.append(node)
        if self.scanner is not None:
            self.scanner.evaluate(node)
        return Proxy(self, index)

    def item(self, proxy: Proxy, key) -> Proxy:
        """`proxy[key]`. A tensor's basic index (ints, slices of ints, None, `...`, a tuple of them: the commonest key)
        holds no proxy, so its node is made here, as `record` would make it, without searching the key."""
        if not self._closed and self.scanner is None and self._step_block is None and basic_index(key):
            nodes, guard, viewed = self.graph.nodes, self._guard, proxy._index
            index = len(nodes)
            # (the user called Proxy.__getitem__, which called this: their frame is the third up)
            node = self._basic_item = Node(index, "call", "operator.getitem", (Ref(viewed), key), {}, user_location(3),
                                           guard, False, (viewed,) if guard is None else unique_refs([viewed], guard),
                                           True)
            nodes.append(node)
            return Proxy(self, index)
        return self.record("call", "operator.getitem", (proxy, key))

    def store(self, proxy: Proxy, key, value) -> None:
        """`proxy[key] = value`. Where it is the write-back of `proxy[key] op= y` with a basic index (Python's
        `v = proxy[key]`, which `item` recorded, `v op= y`, `proxy[key] = v`: a steering edit, the commonest setitem),
        the node is made here, as `record` would make it, and is a `StoreBack`: what the plan would look for again,
        said once. Its arguments are the two nodes just recorded and the key the getitem was recorded with (the same
        object, which holds no proxy): there is nothing in them to look for."""
        nodes, guard, read = self.graph.nodes, self._guard, self._basic_item
        update = len(nodes) - 1
        if (type(value) is Proxy and value._index == update and value._tracer is self and nodes[update - 1] is read
                and read.args[1] is key and not self._closed and self.scanner is None and self._step_block is None
                and item_updated(nodes, update, proxy._index, guard)):
            # (x and the operator's node are two nodes: with no guard there is no duplicate to drop)
            nodes.append(StoreBack(update + 1, "call", "operator.setitem", (read.args[0], key, Ref(update)), {},
                                   user_location(3), guard, False, (proxy._index, update) if guard is None
                                   else unique_refs([proxy._index, update], guard), True))
            return
        self.record("call", "operator.setitem", (proxy, key, value))

    def _guard_in_step(self, op: str, found: list[int]) -> int | None:
        """The guard of a node recorded in a block over steps (see blocks.Iteration) that reads nodes `found`:
        the cond on the step's start for a node that reads nothing made in the step, which would run before the
        step otherwise; none (the block's outer guard) for a module value, or a node that reads a value of the
        step: they wait for the model's calls themselves (a `.source` point called several times a step
        included)."""
        block = self._step_block
        if op == "module_value" or any(ref > block.start for ref in found):
            return block.outer
        return block.begins()

    def _to_refs(self, obj, found: list[int]):
        """`obj` with this graph's proxies made Refs (and earlier traces' saved ones made values); the Refs'
        indices are appended to `found`, in order."""
        kind = type(obj)
        if kind in _PLAIN:
            return obj
        if kind is tuple or kind is list:  # (before the proxy's isinstance check: the commonest holder)
            # this runs for most recorded nodes (an index): items that hold no proxy are passed over without
            # a call, and a tuple with no proxy in it is kept as it is (a list is always copied)
            items = None
            for position, item in enumerate(obj):
                kind_of = type(item)
                if kind_of in _PLAIN or kind_of is slice and (
                        type(item.start) in _PLAIN and type(item.stop) in _PLAIN and type(item.step) in _PLAIN):
                    continue
                new = self._to_refs(item, found)
                if new is not item:
                    if items is None:
                        items = list(obj)
                    items[position] = new
            return kind(obj if items is None else items) if kind is list or items is not None else obj
        if isinstance(obj, Proxy):
            if obj._tracer.graph is self.graph:
                found.append(obj._index)
                return Ref(found[-1])
            return obj.value  # a saved value of an earlier trace
        if kind is dict:
            for item in obj.values():  # (the commonest dict, inputs by name, holds no proxy: copied without a call)
                if type(item) not in _PLAIN:
                    return {key: item if type(item) in _PLAIN else self._to_refs(item, found) for key, item in obj.items()}
            return dict(obj)
        if kind is slice and not (type(obj.start) in _PLAIN and type(obj.stop) in _PLAIN and type(obj.step) in _PLAIN):
            return slice(*self._to_refs((obj.start, obj.stop, obj.step), found))
        return obj

    def _eager(self, op, target, args, kwargs):
        """A saved proxy used after its trace behaves like its value."""
        if op not in ("call", "call_method"):
            raise NotSavedError(
                "this trace has ended: record interventions inside the `with` block. "
                "Values from it are available only when saved with .save()."
            )
        args, kwargs = values_of((args, kwargs))
        if op == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        return (ops.resolve(target) if isinstance(target, str) else target)(*args, **kwargs)

    def mark_saved(self, proxy: Proxy) -> None:
        """`proxy.save()`: keep the value of its node after the run."""
        if self._closed and self._recorder() is None:  # (an open one records: no call to ask it)
            raise NotSavedError(
                "this trace has ended: call .save() inside the `with` block that computes the value"
            )
        block = self._step_block
        if block is not None and proxy._index == block.start:
            # the step's own number is known before its step runs: saved as it is, each step's copy would bind,
            # those of steps that never came too (an early end of sequence); the proxy moves to a copy of it
            # that waits for its step (see _guard_in_step), and so do the lines after that read it
            object.__setattr__(proxy, "_index", self.record("call", "builtins.int", (proxy,))._index)
        graph = self.graph
        if not graph.copies_made and any(repeat.start <= proxy._index < repeat.end for repeat in graph.repeats):
            graph.make_copies()  # a block's node saved after the block: its copies stay as they were
        graph.nodes[proxy._index].saved = True

    # -- verbs shared by traces and sessions ----------------------------------------------------------
    def cond(self, predicate) -> Condition:
        """`with tracer.cond(pred):` runs the block's interventions only when `pred` is true."""
        return Condition(self, self.record("cond", None, (predicate,)))

    def log(self, *values) -> None:
        """Print the values when the graph runs (real values, not proxies)."""
        self.record("log", None, values)

    def apply(self, fn, *args, **kwargs) -> Proxy:
        """Run `fn` on the real values of `args` when the graph runs; returns its traced result."""
        name = ops.name_of(fn)  # an allowed operation is an ordinary call, which can travel as data
        return self.record("call", name, args, kwargs) if name else self.record("apply", fn, args, kwargs)

    def _bind(self, frame, recorders: tuple) -> None:
        for recorder in recorders:  # (a loop, not any(...): no generator made a trace)
            if recorder.results:
                bind_saved(frame, recorders)
                return


NESTED_MESSAGES = {  # a trace started while one is open on the model
    "trace": "a trace on this model is already open; close it before starting another",
    "generate": "model.generate(...) inside an open trace would generate nothing: it only makes a trace of its own. "
                "To generate with interventions, record them in `with model.generate(prompt, max_new_tokens=n) as "
                "tracer:` (with `tracer.invoke(...)` for several prompts) in place of `model.trace()`",
}


class Tracer(Recorder):
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
        if model._tracer is not None or model._origin is not None and model._origin._tracer is not None:
            # refused here, not only at `with`: nnsight 0.4 code calls `model.generate()` in a trace without one
            raise InterlaceError(NESTED_MESSAGES.get(options.get("mode"), NESTED_MESSAGES["trace"]))
        super().__init__(model)
        self.session = model._session
        # in a session every trace records into the session's one graph
        self.graph = self.session.graph if self.session is not None else Graph()
        # persistent interventions of model.edit()
        self.start = self.graph.extend_shifted(model._edits, 0) if model._edits else len(self.graph.nodes)
        self._guard = self.session._guard if self.session is not None else None
        self._caches: list[dict] = []
        self.invokes: list[tuple[tuple, dict]] = []
        self.options = options
        self.current_invoke: int | None = None
        self._offsets: dict[str, int] = {}
        self._in_invoke = False
        self._step = 0  # the generation step an iteration block is recording
        self._iterating = False
        self.copies: list = []  # blocks repeated per step: (start, end, {step: first node of its copy})
        self._stream: Stream | None = None
        self._paused = False  # whether this trace holds a pause of the garbage collector
        if options.get("stream") and self.session is not None:
            raise InterlaceError("stream=True streams one trace: it cannot be used inside a session")
        if options.get("remote") and self.session is not None and not self.session.options.get("remote"):
            raise InterlaceError("a session runs as one request, where it is opened: put remote=True on the "
                                 "session (`with model.session(remote=True):`), not on its traces")
        if args or input_kwargs:
            self.invokes.append((args, input_kwargs or {}))
            self.current_invoke = 0

    def _recorder(self):
        if not self._closed:
            return self
        live = self.model._tracer  # a later trace of the same session, or the session itself
        if live is not None and live.graph is self.graph:
            return live
        session = self.session
        return session if session is not None and not session._closed else None

    def call_index(self, envoy) -> int:
        if envoy._call is not None:  # at_call(n): that call, wherever .next() has moved the module
            return envoy._call + self._step
        return self._offsets.get(envoy._path, 0) + self._step

    def module_value(self, envoy, kind: str) -> Proxy:
        kwargs = {"kind": kind, "call": self.call_index(envoy), "invoke": self.current_invoke}
        if self._closed or self.scanner is not None:  # (the general way: it says why, or scans the node)
            return self.record("module_value", envoy._path, (), kwargs)
        # the commonest node, recorded directly: its arguments hold no proxy, and a module value waits for its
        # module's call, so even in a block over steps its guard is the block's (see _guard_in_step)
        guard = self._guard
        nodes = self.graph.nodes
        index = len(nodes)
        # (the user read `envoy.output`, whose getter called this: their frame is the third up)
        nodes.append(Node(index, "module_value", envoy._path, (), kwargs, user_location(3), guard, False,
                          () if guard is None else (guard,), True))
        return Proxy(self, index)

    def advance(self, path: str, steps: int) -> None:
        self._offsets[path] = self._offsets.get(path, 0) + steps

    # -- user-facing verbs ------------------------------------------------------------------------
    def invoke(self, *args, scan: bool = False, validate: bool = False, **kwargs) -> "Invoker":
        """Add an input to the batch; what is recorded inside sees and changes only its rows.

        scan / validate: check this invoke's lines on fake tensors (as `trace(..., scan=True)`).
        """
        return Invoker(self, args, kwargs, scan=scan or validate)

    @property
    def iter(self) -> Steps:
        """`with tracer.iter[1:3] as step:` applies the block to those generation steps."""
        return Steps(self)

    def all(self) -> Iteration:
        """`with tracer.all():` applies the block to every generation step."""
        return self.iter[:]

    @property
    def result(self) -> Proxy:
        """What the traced call returns: the model's output (for `generate`, the generated ids)."""
        if self._closed:
            raise InterlaceError("tracer.result was read after its trace ended: it has a value only inside the "
                                 "block, so write `out = tracer.result.save()` there and use `out` after")
        return self.model._result_envoy(self).output

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
        block = self._step_block
        if block is not None:
            self._refuse_stop_after_later_steps(block.steps[0])
        self.record("stop")

    def _refuse_stop_after_later_steps(self, step: int) -> None:
        """A stop waits for every line recorded before it: in a block for `step`, after a block over later steps
        (since the previous stop), it could only stop once those had run; say so where it is written."""
        nodes = self.graph.nodes
        previous = next((i for i in range(len(nodes) - 1, self.start - 1, -1) if nodes[i].op == "stop"), -1)
        for start, _, firsts in self.copies:
            if start > previous and max(firsts) > step:
                raise InterlaceError(
                    f"tracer.stop() here is for step {step}, but a block over steps {min(firsts)}..{max(firsts)} is "
                    f"recorded before it, and a stop waits for every line recorded before it: the generation would "
                    f"run to step {max(firsts)} first. Record the stop before that block, or inside it: "
                    f"`with tracer.cond(step == {step}): tracer.stop()` (its step bound by `as step`).")

    def stream(self):
        """After a `stream=True` block: yield each generation `Step` (tokens, text, values saved in the
        step) as it is produced; once the last one is read the saved values bind as usual. Leaving
        the loop early stops the generation at its next step."""
        if self._stream is None:
            raise InterlaceError("tracer.stream() needs a trace started with stream=True "
                                 "(`with lm.generate(prompt, stream=True) as tracer:`), read after its block")
        return self._stream.steps(sys._getframe(1))  # names bind where the loop is written (not in a comprehension)

    # -- context ----------------------------------------------------------------------------------
    def __enter__(self) -> "Tracer":
        self.model._attach(self)
        _open.recorders.append(self)
        collector.pause()  # until the run ends: see collector for why
        self._paused = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            return self._close(exc_type, sys._getframe(1))
        finally:
            self._resume_collector()

    def _resume_collector(self) -> None:
        if self._paused:
            self._paused = False
            collector.resume()

    def _close(self, exc_type, frame) -> bool:
        """End the recording and run it; saved values bind to names in `frame` (the `with` block's)."""
        _open.recorders.remove(self)
        self.model._detach(self)
        self._closed = True
        if exc_type is not None:
            if self.session is not None:
                self.graph.truncate(self.start)
            return False
        if self.session is not None:
            self.session.add_trace(self)  # runs when the session ends
            return False
        request = Request(self.graph, [self.spec(len(self.graph.nodes))])
        if self.options.get("stream"):  # its steps are made as tracer.stream() asks for them
            self._stream = Stream(self, request)
            return False
        if self.options.get("remote") or self.options.get("mode") == "generate":
            # a server's wait, or a generation: they take long, so the collector runs meanwhile (other threads'
            # cycles must not wait for them), and at a forward per token a full walk now and then costs little
            self._resume_collector()
        try:
            outcome = self.model.submit(request, self.options)
        except InterlaceError as error:
            self._name_failing_edit(error)
            raise
        if pending(self.options):  # a remote job: values bind when `tracer.job.result()` is read
            self.job = outcome.on_result(self._receive)
        else:
            self._receive(outcome, frame)
        return False

    def _name_failing_edit(self, error: InterlaceError) -> None:
        """An error at a line of `model.edit()` comes back in every later trace of the model, whose own lines
        are fine: say that the line is an edit, and how to remove it."""
        index = (error.node or {}).get("index")
        if index is not None and self.start <= index < self.start + len(self.model._edits) and error.args:
            error.args = (f"{error.args[0]}\n  That line was recorded by model.edit(): it runs in every trace of "
                          "this model until model.clear_edits().", *error.args[1:])

    def _receive(self, outcome, frame) -> None:
        """Take the run's values: into `tracer.cache()` dicts and the names in `frame` that held saved proxies."""
        if not self.graph.copies_made:  # (those of steps the run did not reach: `tracer.graph` reads as recorded)
            self.graph.make_copies()
        self.results, self.missing = outcome.results, outcome.missing
        if self.copies:
            self._warn_of_plain_lists(frame)
            self._bind_last_steps()
        if self._caches:
            self._bind_caches()
        if self.results:
            bind_saved(frame, (self,))

    def _warn_of_plain_lists(self, frame) -> None:
        """A plain list that a block over several steps appended to holds one value, the last step's: the block is
        recorded once (nnsight 0.5 runs its Python at every step, and ported code expects a value per step)."""
        found = []
        for name, held in frame.f_locals.items():
            if type(held) is list and len(held) <= LARGEST_SCANNED:  # (as binding searches them)
                stepped = next((item for item in held if isinstance(item, Proxy) and item._tracer is self and any(
                    start <= item._index < end for start, end, _ in self.copies)), None)
                if stepped is not None:
                    found.append((name, stepped))
        for name, stepped in found:  # (after the loop: a warning at module level adds a global)
            line = describe_location(self.graph.nodes[stepped._index].location)
            warnings.warn(
                f"`{name}` is a plain list, and a block over several steps appended a value to it ({line}): the "
                "block is recorded once, so the list holds one value, the last step's. To keep a value per step, "
                f"make it a list recorded in the graph: `{name} = interlace.list().save()` before the block.",
                StepsInPlainListWarning, stacklevel=5)

    def _bind_last_steps(self) -> None:
        """A value saved in a block over several steps binds as its last step's that ran, as a name
        assigned in a loop holds its last value (each step's is `step[h]` when streaming, or collect them
        with `interlace.list()`)."""
        results = self.results
        for start, end, firsts in self.copies:
            latest = [firsts[step] for step in sorted(firsts, reverse=True)]
            for node in self.graph.nodes[start:end]:
                if not node.saved:
                    continue
                offset = node.index - start
                found = next((first + offset for first in latest if first + offset in results), None)
                if found is not None:
                    results[node.index] = results[found]

    def spec(self, end: int) -> TraceSpec:
        """This trace as a part of a request: its nodes, inputs and run options."""
        options = {}
        for key in ("mode", "kwargs", "early_stop"):  # (loops: a comprehension is a call, on cold caches)
            if key in self.options:
                options[key] = self.options[key]
        found: list[int] = []
        invokes = []
        for args, kwargs in self.invokes:
            invokes.append((self._to_refs(args, found), self._to_refs(kwargs, found) if kwargs else {}))
        return TraceSpec(self.start, end, invokes, options, inputs_hold_refs=bool(found))

    def _bind_caches(self) -> None:
        """Fill `tracer.cache()` dicts with their saved values."""
        for cached in self._caches:
            bound(cached, (self,), 1)
            for path in [p for p, v in cached.items() if isinstance(v, Proxy)]:
                del cached[path]  # that module did not run


class Editor(Tracer):
    """`with model.edit() as edited:` records interventions that apply to every later trace.

    Record through either spelling: `model.layer.output[:] = 0` or `edited.layer.output[:] = 0`.
    """

    def __init__(self, model, inputs: tuple = (), **options):
        super().__init__(model, inputs, **options)
        self.current_invoke = None  # the example input is for checking: edits apply to every row

    def __enter__(self):
        edited = self.model if self.options["inplace"] else self.model._copy()  # (before the trace opens: may fail)
        super().__enter__()
        self.edited = edited
        self.edited._tracer = self
        return self.edited

    def mark_saved(self, proxy: Proxy) -> None:
        raise InterlaceError(
            "a value saved in model.edit() would never have a value: the edit's lines run inside each later trace, "
            "and only that trace's own saves are kept. Save it in the trace: "
            "`with edited.trace(...): value = edited.<module>.output.save()`")

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._resume_collector()
        _open.recorders.remove(self)
        self.model._detach(self)
        self.edited._tracer = None
        self._closed = True
        if exc_type is None:
            self.edited._edits = list(self.graph)  # (as recorded: see Graph.add_copy_later)
        return False


class StepsInPlainListWarning(UserWarning):
    """A plain Python list holds a value saved in a block over several generation steps: only the last step's."""


def pending(options: dict) -> bool:
    """Whether a submission returns a job handle (remote, blocking=False) rather than its outcome."""
    return bool(options.get("remote")) and not options.get("blocking", True)


class Invoker:
    """One input of a batched trace (`with tracer.invoke(x):`); with no input (`tracer.invoke()`), lines for every
    row of the batch."""

    def __init__(self, tracer: Tracer, args: tuple, kwargs: dict, *, scan: bool = False):
        self.tracer = tracer
        self.args, self.kwargs = args, kwargs
        self.scan = scan
        self.index: int | None = None

    def __enter__(self) -> "Invoker":
        tracer = self.tracer
        if tracer._closed:
            raise InterlaceError("this trace has ended (its model ran when its `with` block closed): open "
                                 "tracer.invoke(...) inside the block, or start a new trace")
        if tracer._in_invoke:
            raise InterlaceError("invokes cannot be nested: close one `tracer.invoke` before opening the next")
        self._outer = (tracer.current_invoke, tracer._offsets)
        if self.args or self.kwargs:
            tracer.invokes.append((self.args, self.kwargs))
            self.index = len(tracer.invokes) - 1
        # else nnsight 0.5's `tracer.invoke()`: no input of its own, its lines see every row, as lines outside
        # the invokes do (index None), with module calls counted from the first, as in an invoke
        tracer.current_invoke, tracer._offsets = self.index, {}
        tracer._in_invoke = True
        if self.scan and tracer.scanner is None:
            tracer.model._start_scan(tracer)  # captures every invoke so far, this one included
        elif tracer.scanner is not None and self.index is not None:
            tracer.model._scan_invoke(tracer, self.index)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.tracer.current_invoke, self.tracer._offsets = self._outer
        self.tracer._in_invoke = False
        return False
