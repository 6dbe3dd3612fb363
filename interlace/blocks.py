"""Blocks that shape what is recorded inside them: conditions and loops.

`Condition` guards the nodes recorded in its block by a `cond` node. `Steps`/`Iteration` record a
block once and apply it to several generation steps; `SessionIteration` records a block of a session
(traces included) once and applies it to each of several values. Both repeat the block as copies of
its nodes (`Graph.extend_shifted`), so the graph stays plain data that runs anywhere; an `Iteration`
also records its copies in `Graph.repeats`, so the block travels once on the wire, and leaves them to
be made as the run reaches their steps (`Graph.add_copy_later`): its end costs no node per step.
"""

from __future__ import annotations

from .errors import InterlaceError, describe_location
from .graph import Ref, TraceSpec, map_refs, shift_refs
from .proxy import Proxy


class Condition:
    """The block of a `tracer.cond(...)` or `session.cond(...)`: its nodes run only when it is true."""

    def __init__(self, recorder, node: Proxy):
        self.recorder, self.node = recorder, node

    def __enter__(self) -> Proxy:
        self.outer, self.recorder._guard = self.recorder._guard, self.node._index
        return self.node

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.recorder._guard = self.outer
        return False


class Steps:
    """`tracer.iter[...]`: choose the generation steps a block applies to."""

    def __init__(self, tracer):
        self.tracer = tracer

    def __getitem__(self, key) -> "Iteration":
        steps = range(self.tracer.options.get("steps", 1))
        if isinstance(key, int):
            written, key = f"tracer.iter[{key}]", slice(key, key + 1 if key != -1 else None)
        elif isinstance(key, slice):
            written = f"tracer.iter[{key.start}:{key.stop}]"
        else:
            raise InterlaceError(f"tracer.iter takes a step or a slice of steps, not {type(key).__name__}")
        chosen = steps[key]
        if not chosen:
            raise InterlaceError(f"{written} selects no step: this generation has {len(steps)} (steps 0 to "
                                 f"{len(steps) - 1}, one per new token); choose steps below {len(steps)}, or raise "
                                 "max_new_tokens")
        return Iteration(self.tracer, chosen)


class Iteration:
    """A block recorded once and applied to several generation steps.

    The block's nodes are recorded for the first step, then copied for each later step with every
    module call index moved by the step distance. The value bound by `as` is the step number; a value
    saved in the block binds as its last step's (that ran), as a name assigned in a loop; `interlace.list()`
    collects one entry per step.
    """

    def __init__(self, tracer, steps: range):
        self.tracer, self.steps = tracer, steps

    def __iter__(self):
        raise InterlaceError("a block over steps is recorded once, so it is a `with` block, not a loop: write "
                             "`with tracer.iter[...] as step:` (nnsight's `for step in tracer.iter[...]`)")

    def __enter__(self) -> Proxy:
        tracer = self.tracer
        if tracer._iterating:
            raise InterlaceError("iteration blocks cannot be nested")
        tracer._iterating = True
        self.start = len(tracer.graph)
        step = tracer.record("call", "builtins.int", (self.steps[0],))
        self.outer, self.cond = tracer._guard, None
        tracer._step, tracer._step_block = self.steps[0], self
        return step

    def begins(self) -> int:
        """The guard of the block's nodes that read nothing made in the step (a constant appended to a list),
        which would otherwise run before the model and for steps that never come: a cond on the inputs of the
        model's call of the step (an `(args, kwargs)` pair: always true), recorded when a node first needs it.
        The other nodes wait for the step's module values themselves (see Recorder._guard_in_step)."""
        if self.cond is None:
            tracer = self.tracer
            begins = tracer.record("module_value", "", (), {"kind": "inputs", "call": self.steps[0], "invoke": None})
            self.cond = tracer.record("cond", None, (begins,))._index
        return self.cond

    def __exit__(self, exc_type, exc, tb) -> bool:
        tracer = self.tracer
        tracer._step, tracer._iterating = 0, False
        tracer._step_block = None
        if exc_type is not None:
            return False
        graph, start, end, first_step = tracer.graph, self.start, len(tracer.graph), self.steps[0]
        # the copies are made as the run reaches their steps (see Plan), or when something reads them
        repeat = graph.repeat(start, end, [(step - first_step, step) for step in self.steps[1:]], later=True)
        # where each step's copy starts (a streamed step finds its values)
        firsts = {first_step: start, **{step: first for first, _, step in repeat.copies}}
        if _read_per_step(tracer, start, end, firsts) and repeat.copies:
            graph.repeats.remove(repeat)  # its copies are no longer shifts of the block: they travel as nodes
        tracer.copies.append((start, end, firsts))
        return False


class SessionIteration:
    """`with session.iter(values) as value:` — a block of a session applied to each value.

    The block (its session-level nodes and whole traces) is recorded once, for the first value, and
    copied for the others; the value is `values[i]` in copy i. `session.stop()` inside ends the
    loop. `values` may be a list built in the session from values known without the model
    (`session.apply(list)` and its appends): its length is taken now, its items when the graph
    runs. Names bound inside the block hold the last value's results; collect every value's with
    `interlace.list()` (a list made before the loop and appended to inside it).
    """

    def __init__(self, session, values):
        self.session = session
        # a list built in the session is a traced value: its length now decides how often the block
        # repeats, its items are read when the graph runs
        self.values = values if isinstance(values, Proxy) else tuple(values)
        self.length = len(session.rehearse(values) if isinstance(values, Proxy) else self.values)

    def __enter__(self) -> Proxy:
        session = self.session
        if not self.length:
            raise InterlaceError("session.iter was given no values")
        if session.model._tracer is not None:
            raise InterlaceError("session.iter loops over traces: open it outside `with model.trace(...)`; "
                                 "inside a generation use tracer.iter")
        self.source = session.record("call", "builtins.tuple", (self.values,))
        self.start, self.first_trace = len(session.graph), len(session.traces)
        return session.record("call", "operator.getitem", (self.source, 0))

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            return False
        session, graph, start = self.session, self.session.graph, self.start
        graph.make_copies()  # (the block's generations' blocks over steps: each value's loop copies them)
        template, traces = graph.nodes[start:], session.traces[self.first_trace:]
        offset = 0
        for number in range(1, self.length):
            first = graph.extend_shifted(template, start)
            graph.nodes[first].args = (Ref(self.source._index), number)
            offset = first - start
            for node in graph.nodes[first:]:  # an inner loop's stops end that loop's copy
                if node.op == "stop" and node.kwargs.get("skip_to") is not None:
                    node.kwargs = {**node.kwargs, "skip_to": node.kwargs["skip_to"] + offset}
            for trace in traces:
                session.traces.append(TraceSpec(trace.start + offset, trace.end + offset,
                                                shift_refs(trace.invokes, start, offset), trace.options))
        if offset:  # names bound in the block get the last value's results
            session.aliases.update({node.index: node.index + offset for node in template if node.saved})
        end = len(graph)
        for node in graph.nodes[start:]:
            if node.op == "stop" and node.kwargs.get("session") and node.kwargs.get("skip_to") is None:
                node.kwargs = {**node.kwargs, "skip_to": end}
        return False


def _read_per_step(tracer, start: int, end: int, firsts: dict) -> bool:
    """Make each step's copy of the block `start..end` read the same step's value of what it reads from
    an earlier block over several steps (a name bound there is that block's first step). A block over
    one step is one value, read at every step. Whether any reference changed."""
    earlier = [(s, e, f) for s, e, f in tracer.copies if len(f) > 1]
    if not earlier:
        return False
    tracer.graph.make_copies()  # (the copies change)
    nodes, size, changed = tracer.graph.nodes, end - start, False
    for step, first in firsts.items():
        for node in nodes[first:first + size]:
            moves = {}  # reference -> the same step's node
            for index in node.refs():
                for block_start, block_end, block_firsts in earlier:
                    if block_start <= index < block_end:
                        if step not in block_firsts:
                            raise InterlaceError(
                                f"{describe_location(node.location)}: this line runs at step {step} and reads a value "
                                f"recorded in a block over steps {sorted(block_firsts)} (%{index}), which has none at "
                                f"step {step}: read it in a block over the same steps, or take it from one step "
                                "(tracer.iter[k]) to read it at every step").at(node)
                        if block_firsts[step] != block_start:
                            moves[index] = block_firsts[step] + index - block_start
            if moves:
                moved = lambda ref: Ref(moves.get(ref.index, ref.index))  # noqa: E731
                node.args, node.kwargs = map_refs(node.args, moved), map_refs(node.kwargs, moved)
                node.guard = moves.get(node.guard, node.guard)
                node._refs, changed = None, True
    return changed
