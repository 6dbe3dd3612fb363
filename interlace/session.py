"""Session: several traces, and the control flow between them, run together when the block ends.

Everything recorded in a session goes into one graph: the traces' nodes, and between them the
session's own nodes (`session.apply`, `session.cond`, `session.iter`, `session.stop`, values from one
trace used in the next). The session becomes one request: each trace a span of the graph with its
inputs, and the session's own nodes spans that run without the model. Remotely it is one request.
"""

from __future__ import annotations

import sys

from . import ops
from .blocks import SessionIteration
from .errors import InterlaceError, describe_location
from .graph import Graph, Ref, Request, TraceSpec, map_refs
from .tracer import Recorder, Tracer, active, pending


class Session(Recorder):
    """Several traces recorded into one graph and run together when the block ends.

    >>> import torch, interlace
    >>> net = interlace.Model(torch.nn.Linear(2, 2))
    >>> with net.session() as session:
    ...     outputs = interlace.list().save()
    ...     with session.iter([1.0, 2.0, 3.0]) as scale:
    ...         with net.trace(torch.ones(1, 2)):
    ...             _ = outputs.append(net.output * scale)
    >>> [round(o[0, 0].item() / outputs[0][0, 0].item(), 3) for o in outputs]
    [1.0, 2.0, 3.0]
    """

    def __init__(self, model, **options):
        super().__init__(model)
        self.options = options  # scan (for every trace inside), remote, blocking, timeout, backend
        self.graph = Graph()
        self.traces: list[TraceSpec] = []  # in graph order; a session.iter adds copies
        self.tracers: list[Tracer] = []  # the traces as recorded, for binding their caches
        self.aliases: dict[int, int] = {}  # node -> node whose result it takes (session.iter's last copy)

    def _recorder(self):
        if self._closed:
            return None
        return self.model._tracer or self  # a node recorded while a trace is open belongs to it

    def add_trace(self, tracer: Tracer) -> None:
        """A trace of this session has been recorded; it runs when the session ends."""
        self.traces.append(tracer.spec(len(self.graph)))
        self.tracers.append(tracer)

    # -- control flow between traces ---------------------------------------------------------------
    def iter(self, values) -> SessionIteration:
        """`with session.iter(values) as value:` applies the block (traces included) to each value."""
        return SessionIteration(self, values)

    def rehearse(self, proxy):
        """The value of `proxy` now, from the session's own nodes recorded so far (no model runs).

        Used by `session.iter` over a list built in the session: the list, and every call recorded on
        it (its appends), are computed here once for its length (and again when the session runs). A
        value that needs a trace, or sits under a condition, is an error.
        """
        self.graph.make_copies()
        nodes = self.graph.nodes
        needed: set[int] = set()

        def need(index):
            stack = [index]
            while stack:
                node = nodes[stack.pop()]
                if node.index not in needed:
                    needed.add(node.index)
                    stack.extend(node.refs())

        need(proxy._index)
        grown = True
        while grown:  # calls on a needed value (list.append, x[0] = ...) change it: they are needed too
            grown = False
            for node in nodes:
                receiver = node.args[0] if node.args else None
                if (node.index not in needed and type(receiver) is Ref and receiver.index in needed
                        and (node.op == "call_method" or node.target in ops.MUTATING_TARGETS)):
                    need(node.index)
                    grown = True
        values: dict[int, object] = {}
        for index in sorted(needed):
            node = nodes[index]
            if node.op not in ("call", "call_method", "apply") or node.guard is not None:
                raise InterlaceError(
                    f"session.iter needs the length of its values when it is recorded, but they depend on "
                    f"{node.describe()} ({describe_location(node.location)}), which has a value only when the "
                    "session runs. Loop over values built in the session without traces or conditions, or "
                    "over a Python list."
                )
            args, kwargs = map_refs((node.args, node.kwargs), lambda ref: values[ref.index])
            if node.op == "call_method":
                values[index] = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                fn = ops.resolve(node.target) if isinstance(node.target, str) else node.target
                values[index] = fn(*args, **kwargs)
        return values[proxy._index]

    def stop(self) -> None:
        """End the innermost `session.iter` loop here (or, outside loops, the rest of the session)."""
        self.record("stop", None, (), {"session": True, "skip_to": None})

    # -- context ----------------------------------------------------------------------------------
    def __enter__(self) -> "Session":
        if self.model._session is not None:
            raise InterlaceError(
                "sessions cannot be nested: a session of this model is already open. Record these traces in that "
                "session (a method that opens its own, such as collect_last_token_activations_session, is called "
                "outside any session)"
            )
        self.model._session = self
        active().append(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.model._session = None
        active().remove(self)
        self._closed = True
        try:
            if exc_type is None:
                self._run(sys._getframe(1))
        finally:
            self.tracers.clear()  # tracers point back at the session: no cycle may keep values alive
        return False

    def request(self) -> Request:
        """The session as one request: its traces, and spans of its own nodes between them."""
        spans, position = [], 0
        for trace in self.traces:
            if trace.start > position:
                spans.append(TraceSpec(position, trace.start, [], {"mode": "session"}))
            spans.append(trace)
            position = trace.end
        if position < len(self.graph):
            spans.append(TraceSpec(position, len(self.graph), [], {"mode": "session"}))
        return Request(self.graph, spans)

    def _run(self, frame) -> None:
        outcome = self.model.submit(self.request(), self.options)
        if pending(self.options):  # a remote job: values bind when `session.job.result()` is read
            tracers = list(self.tracers)  # self.tracers is cleared when the block ends
            self.job = outcome.on_result(lambda outcome, frame: self._receive(outcome, frame, tracers))
        else:
            self._receive(outcome, frame, self.tracers)

    def _receive(self, outcome, frame, tracers) -> None:
        self.graph.make_copies()  # (see Tracer._receive)
        results = outcome.results
        for alias, source in self.aliases.items():
            if source in results:
                results[alias] = results[source]
        recorders = (self, *tracers)
        for recorder in recorders:
            recorder.results, recorder.missing = results, outcome.missing
        for tracer in tracers:
            tracer._bind_last_steps()
            tracer._bind_caches()
        self._bind(frame, recorders)  # the names, once for all traces
