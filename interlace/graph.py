"""The intervention graph as plain data: `Node`, `Ref` and `Graph`.

A graph is an ordered list of nodes. Each node names an operation (`op`, from the closed set
`OPS`), a `target` (a module path, a registry name, or for trusted graphs a callable), `args` and
`kwargs` that may hold `Ref`s to earlier nodes, the user's source location, an optional `guard`
(the `cond` node that must be true for it to run) and a `saved` flag (keep its value after the
run). Nothing here knows about hooks, proxies or models: a graph can be printed, compared,
serialized and executed anywhere. A `Request` is a graph with the traces that run it (inputs and
options per trace): what a client sends to a server.

A block applied to several generation steps (`tracer.all()`, `tracer.iter[...]`) is held as copies
of its nodes, so the executor sees one plain list; `Graph.repeats` also records it as data (the
block's span and, per copy, where it starts, its call shift and its step), so the wire format can
send the block once and a loader rebuild and check the copies by arithmetic.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field
from types import CodeType

from . import ops

OPS = frozenset(
    {
        "module_value",  # target=path; kwargs: kind (output|input|inputs), call, invoke
        "parameter",  # target=dotted name of a parameter or buffer
        "call",  # target=registry name (or a callable in trusted graphs)
        "call_method",  # target=method name; args[0] is the object
        "swap",  # args=(Ref to a module_value or grad node, new value)
        "skip",  # target=path; kwargs: call, invoke; args=(value,)
        "apply",  # target=user callable (trusted only)
        "module_call",  # target=path; run that module on args/kwargs
        "grad",  # args=(Ref to a tensor,); its gradient in the backward pass
        "cond",  # args=(predicate,); a bool guarding later nodes
        "stop",  # end the forward pass here
        "log",  # args=values to print
    }
)


class Ref:
    """A reference to the value of node `index`, as it appears inside args and kwargs."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __repr__(self) -> str:
        return f"%{self.index}"

    def __eq__(self, other) -> bool:
        return isinstance(other, Ref) and other.index == self.index

    def __hash__(self) -> int:
        return hash(("Ref", self.index))

    def __reduce__(self):
        return Ref, (self.index,)  # (pickle's default for slots builds a state dict per ref)


class Node:
    """One recorded operation. `location` is the user's (filename, lineno)."""

    __slots__ = ("index", "op", "target", "args", "kwargs", "_location", "guard", "saved", "_refs", "_shallow")

    def __init__(self, index, op, target=None, args=(), kwargs=None, location=None, guard=None, saved=False,
                 refs=None, shallow=False):
        self.index = index
        self.op = op
        self.target = target
        self.args = args
        self.kwargs = kwargs if kwargs is not None else {}
        self._location = location
        self.guard = guard
        self.saved = saved
        # what `refs()` finds, where the recorder found it while making the arguments (else found when first asked)
        self._refs = refs
        self._shallow = shallow

    def __reduce__(self):
        # (a worker process gets its batch pickled: the fields as one tuple, not a state dict of every slot)
        return Node, (self.index, self.op, self.target, self.args, self.kwargs, self.location, self.guard, self.saved)

    @property
    def name(self) -> str:
        return f"%{self.index}"

    @property
    def location(self) -> tuple[str, int] | None:
        """The user's (filename, lineno). The recorder may leave `(code, offset)` of the user's call instead:
        a frame's line number is found by reading its code's line table from the start (a few µs per node
        late in a long script or notebook cell), so it is worked out here, once, when first asked for."""
        where = self._location
        if where and type(where[0]) is CodeType:  # (an empty location, from a Node made by hand, stays as it is)
            where = self._location = (where[0].co_filename, _line_of(*where))
        return where

    def refs(self) -> tuple[int, ...]:
        """Indices of the nodes this node reads, each once, in order (guard included)."""
        if self._refs is None:  # nodes are not changed after recording, so this is computed once
            found: list[int] = []
            top = 0  # references that are arguments themselves, not inside one
            for item in (*self.args, *self.kwargs.values()) if self.kwargs else self.args:
                kind = type(item)
                if kind is Ref:
                    found.append(item.index)
                    top += 1
                elif kind in _HOLDERS:
                    _collect_refs(item, found)
            self._shallow = top == len(found)
            self._refs = unique_refs(found, self.guard)
        return self._refs

    def bind(self, values) -> tuple[tuple, dict]:
        """`(args, kwargs)` with each Ref replaced by `values[ref.index]`."""
        if self._refs is None:
            self.refs()
        if not self._shallow:
            lookup = lambda ref: values[ref.index]  # noqa: E731
            return map_refs(self.args, lookup), map_refs(self.kwargs, lookup)
        # every Ref is an argument itself (not inside a slice or list): one pass, no recursion
        args = tuple([values[a.index] if type(a) is Ref else a for a in self.args])
        kwargs = {key: values[v.index] if type(v) is Ref else v for key, v in self.kwargs.items()} if self.kwargs else {}
        return args, kwargs

    def describe(self) -> str:
        """A short human description of what the node does, e.g. `model.layer1.output`."""
        if self.op == "module_value":
            call = self.kwargs.get("call", 0)
            suffix = f" (call {call})" if call else ""
            return f"{self.target or '<root>'}.{self.kwargs.get('kind', 'output')}{suffix}"
        if self.op == "call" and self.target == "builtins.getattr" and len(self.args) == 2 and type(self.args[1]) is str:
            return f".{self.args[1]}"  # (`lm.output.logits`, recorded as getattr(output, 'logits'))
        if self.op in ("call", "apply"):
            return f"{target_name(self.target)}(...)"
        if self.op == "call_method":
            return f".{self.target}(...)"
        return self.op

    def _key(self):
        return (self.op, target_name(self.target), repr(self.args), repr(self.kwargs), self.guard, self.saved)

    def __eq__(self, other) -> bool:
        return isinstance(other, Node) and self.index == other.index and self._key() == other._key()

    def __hash__(self) -> int:
        return hash((self.index,) + self._key())

    def __repr__(self) -> str:
        parts = [_format(a) for a in self.args] + [f"{k}={_format(v)}" for k, v in self.kwargs.items()]
        target = "" if self.target is None else f"[{target_name(self.target)}]"
        guard = f" if %{self.guard}" if self.guard is not None else ""
        guard += "  saved" if self.saved else ""
        where = ""
        if self.location:
            where = f"  # {os.path.basename(self.location[0])}:{self.location[1]}"
        return f"%{self.index} = {self.op}{target}({', '.join(parts)}){guard}{where}"


class StoreBack(Node):
    """The `x[k] = v` of `x[k] op= y` as the recorder made it (`Recorder.store`): it knows that this node and the two
    before it are what `item_updated` and a basic index `k` describe, so the plan need not look again. A copy of a
    node (`_shifted`) or a decoded one is a plain Node again, which the plan looks at in full."""

    __slots__ = ()


# the line table of the code object whose lines were last asked for: (it, where each run of instructions of one
# line starts, its line). A graph sent to a server asks for every node's line, most of them in one script or
# cell; a code object is not a dict key here, as its hash reads all of its code.
_last_lines: tuple = (None, [], [])


def _line_of(code: CodeType, offset: int) -> int:
    """The line of the instruction at `offset` in `code`, as a frame's `f_lineno` there gives it."""
    global _last_lines
    table = _last_lines
    if table[0] is not code:
        runs = list(code.co_lines())  # (start, end, line), in order, from offset 0
        table = _last_lines = (code, [start for start, _, _ in runs], [line for _, _, line in runs])
    _, starts, lines = table
    line = lines[bisect.bisect_right(starts, offset) - 1]
    return line if line is not None else code.co_firstlineno


def unique_refs(found: list[int], guard: int | None) -> tuple[int, ...]:
    """A node's `refs()` from the indices its arguments hold, in order, and its guard."""
    if guard is not None:
        found.append(guard)
    return tuple(dict.fromkeys(found)) if len(found) > 1 else tuple(found)


_INDEX_PARTS = frozenset({int, type(None), type(Ellipsis)})  # (a bool is a mask, not an int index)


def basic_index(key) -> bool:
    """Whether `key` is a basic tensor index, which gives a view and holds no node's value: ints, slices of ints,
    None, Ellipsis, and tuples of them."""
    for part in key if type(key) is tuple else (key,):
        kind = type(part)
        if kind is slice:
            if (type(part.start) not in _INDEX_PARTS or type(part.stop) not in _INDEX_PARTS
                    or type(part.step) not in _INDEX_PARTS):
                return False
        elif kind not in _INDEX_PARTS:
            return False
    return True


def item_updated(nodes, update: int, base: int, guard) -> bool:
    """Whether nodes `update - 1` and `update` are `v = x[k]` and `v op= y` (an in-place operator: `+=`, `*=`, ...),
    `x` node `base`, both under `guard`: the first two nodes `x[k] op= y` records. The third, Python's write-back
    `x[k] = v`, the recorder makes directly and the plan skips where it would copy `v` onto itself; each compares
    the key `k` as it needs."""
    if update < 1:
        return False
    read, change = nodes[update - 1], nodes[update]
    read_args, change_args = read.args, change.args
    return (change.op == "call" and change.target in ops.IN_PLACE_OPERATORS and change.guard == guard
            and bool(change_args) and type(change_args[0]) is Ref and change_args[0].index == update - 1
            and read.op == "call" and read.target == "operator.getitem" and read.guard == guard
            and len(read_args) == 2 and type(read_args[0]) is Ref and read_args[0].index == base)


def _format(value) -> str:
    """Arguments as a user would write them: `[:, -1]`, `...`, `%3`."""
    kind = type(value)
    if kind is slice:
        parts = ["" if p is None else _format(p) for p in (value.start, value.stop, value.step)]
        return ":".join(parts[:2] if value.step is None else parts)
    if value is Ellipsis:
        return "..."
    if kind is tuple:
        inner = ", ".join(_format(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if kind is list:
        return "[" + ", ".join(_format(v) for v in value) + "]"
    if kind is dict:
        return "{" + ", ".join(f"{k!r}: {_format(v)}" for k, v in value.items()) + "}"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"tensor{tuple(value.shape)}:{str(value.dtype).replace('torch.', '')}"
    return repr(value)


def target_name(target) -> str:
    if target is None or isinstance(target, str):
        return str(target)
    return getattr(target, "__qualname__", None) or repr(target)


# the kinds of value a Ref can be in; anything else is passed over without a call (these run per node)
_HOLDERS = frozenset({Ref, tuple, list, dict, slice})


def refs_in(obj) -> list[int]:
    """The indices of the Refs inside `obj` (through tuples, lists, dicts and slices), in order."""
    found: list[int] = []
    _collect_refs(obj, found)
    return found


def _collect_refs(obj, found: list) -> None:
    kind = type(obj)
    if kind is Ref:
        found.append(obj.index)
    elif kind is tuple or kind is list:
        for item in obj:
            if type(item) in _HOLDERS and (type(item) is not slice or type(item.start) is Ref
                                           or type(item.stop) is Ref or type(item.step) is Ref):
                _collect_refs(item, found)
    elif kind is dict:
        for item in obj.values():
            if type(item) in _HOLDERS:
                _collect_refs(item, found)
    elif kind is slice:
        for part in (obj.start, obj.stop, obj.step):
            if type(part) is Ref:
                found.append(part.index)


def map_refs(obj, fn):
    """Return `obj` with every Ref replaced by `fn(ref)`, through tuples, lists, dicts and slices."""
    kind = type(obj)
    if kind is Ref:
        return fn(obj)
    if kind is tuple:
        return tuple([map_refs(item, fn) if type(item) in _HOLDERS else item for item in obj])
    if kind is list:
        return [map_refs(item, fn) if type(item) in _HOLDERS else item for item in obj]
    if kind is dict:
        return {key: map_refs(item, fn) if type(item) in _HOLDERS else item for key, item in obj.items()}
    if kind is slice and (type(obj.start) is Ref or type(obj.stop) is Ref or type(obj.step) is Ref):
        return slice(map_refs(obj.start, fn), map_refs(obj.stop, fn), map_refs(obj.step, fn))
    return obj


def shift_refs(obj, base: int, offset: int):
    """`obj` with references to nodes at or after `base` moved by `offset` (a block's copy)."""
    return map_refs(obj, lambda ref: Ref(ref.index + offset) if ref.index >= base else ref)


@dataclass(frozen=True)
class Repeat:
    """Nodes `start..end` (the template) repeated: each copy `(first, calls, value)` is the template
    appended at node `first` by `Graph.add_copy`, module calls moved by `calls`, its first node's args
    `(value,)` (the step a `tracer.iter` block binds)."""

    start: int
    end: int
    copies: tuple[tuple[int, int, int], ...]


def copied_spans(repeats, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """The spans `(first, stop)` of the copies in `repeats` that lie, with their template, in
    `start..end`, in order: nodes that need no check or writing of their own."""
    spans = []
    for repeat in repeats:
        size = repeat.end - repeat.start
        if start <= repeat.start and (end is None or repeat.end <= end):
            spans += [(first, first + size) for first, _, _ in repeat.copies if end is None or first + size <= end]
    spans.sort()
    return spans


def _shifted(nodes, base: int, first: int, calls: int) -> list[Node]:
    """Copies of `nodes` numbered from `first`: see `Graph.extend_shifted`."""
    offset = first - base
    shift = lambda ref: Ref(ref.index + offset) if ref.index >= base else ref  # noqa: E731 - one for all nodes
    made = []
    for index, node in enumerate(nodes, first):
        kwargs = map_refs(node.kwargs, shift) if node.kwargs else {}
        if calls and node.op in ("module_value", "skip"):
            kwargs["call"] += calls
        guard = node.guard + offset if node.guard is not None and node.guard >= base else node.guard
        made.append(Node(index, node.op, node.target, map_refs(node.args, shift) if node.args else (), kwargs,
                         node._location, guard, node.saved))
    return made


class Graph:
    """An ordered list of nodes, and the blocks of it that repeat (`repeats`, see `Repeat`).

    >>> g = Graph()
    >>> a = g.add("module_value", "layer1", kwargs={"kind": "output", "call": 0, "invoke": 0})
    >>> b = g.add("call", "operator.mul", (Ref(a.index), 2), saved=True)
    >>> print(g)
    %0 = module_value[layer1](kind='output', call=0, invoke=0)
    %1 = call[operator.mul](%0, 2)  saved
    """

    def __init__(self):
        self.nodes: list[Node] = []
        self.repeats: list[Repeat] = []  # a description of some nodes: see intact_repeats
        # how many of the first nodes were checked for an untrusted run where they were decoded
        # (`deserialize_request`): `check_against_model` checks their structure only past them
        self.checked = 0
        self.copies_made = True  # False while `add_copy_later` nodes may stand in for copies: see make_copies

    def add(self, op, target=None, args=(), kwargs=None, location=None, guard=None, saved=False, refs=None,
            shallow=False) -> Node:
        """Append a node; `refs`, `shallow`: what `Node.refs` would find, where the caller knows it already."""
        node = Node(len(self.nodes), op, target, args, kwargs, location, guard, saved, refs, shallow)
        self.nodes.append(node)
        return node

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self):
        self.make_copies()
        return iter(self.nodes)

    def __getitem__(self, index: int) -> Node:
        return self.nodes[index]

    def __eq__(self, other) -> bool:
        if not isinstance(other, Graph):
            return False
        self.make_copies()
        other.make_copies()
        return self.nodes == other.nodes

    def __hash__(self) -> int:
        self.make_copies()
        return hash(tuple(self.nodes))

    def extend_shifted(self, nodes, base: int, calls: int = 0) -> int:
        """Append copies of `nodes`; returns the index of the first copy.

        References (and guards) to nodes at or after `base` move by the distance from `base` to the
        first copy, so a block recorded once can be repeated (edits replayed into a trace, a block
        applied to several generation steps or session values); module calls move by `calls`.
        """
        self.make_copies()  # (`nodes` may be some of this graph's own)
        first = len(self.nodes)
        self.nodes += _shifted(nodes, base, first, calls)
        return first

    def add_copy(self, start: int, end: int, calls: int, value: int) -> int:
        """Append a copy of nodes `start..end` with module calls moved by `calls` and its first node's
        args `(value,)`; returns the index of its first node. It is not recorded in `repeats`."""
        first = len(self.nodes)
        self.nodes += self.nodes[start:end]
        self.make_copy(start, end, first, calls, value)
        return first

    def add_copy_later(self, start: int, end: int) -> int:
        """Append the template's own nodes `start..end` where `add_copy` would append a copy of them: they
        stand in for it until it is made (`make_copies`, or one by one: `make_copy`; `Plan` does it), which
        needs its `Repeat` entry (its call shift and step). A server's front checks a copy by its template
        (see validate.py), so it needs no more, and the nodes it pickles for its worker process are then the
        template's again (pickle writes an object it has written once as a reference): the copies are made
        where the graph runs, and no step of this costs a node. A block over steps is recorded so too
        (blocks.py). Such a graph must not run before its copies are made, and what reads its nodes as
        recorded (iterating it, printing or comparing it, `saved()`) makes them all first."""
        first = len(self.nodes)
        self.nodes += self.nodes[start:end]
        self.copies_made = False
        return first

    def make_copies(self) -> None:
        """Make the copies of `repeats` that `add_copy_later` left to the template's nodes, in graph order
        (a template may hold the copies of a block inside it); one made already stays as it was made."""
        if self.copies_made:
            return
        for first, start, end, calls, value in sorted((first, repeat.start, repeat.end, calls, value)
                                                      for repeat in self.repeats
                                                      for first, calls, value in repeat.copies):
            self.make_copy(start, end, first, calls, value)
        self.copies_made = True

    def make_copy(self, start: int, end: int, first: int, calls: int, value: int) -> None:
        """Make the copy at node `first` of nodes `start..end` (module calls moved by `calls`, its first
        node's args `(value,)`) that `add_copy_later` left to the template's nodes (a run that plans a copy
        as its step comes makes it then), unless it was made already: the nodes of a copy are its own, so
        one still left holds its template's first node itself."""
        if not self.left(start, first):
            return
        self.nodes[first : first + end - start] = _shifted(self.nodes[start:end], start, first, calls)
        self.nodes[first].args = (value,)

    def left(self, start: int, first: int) -> bool:
        """Whether the copy at node `first` of the block starting at node `start` is still its template's
        nodes (`add_copy_later`): a copy made has nodes of its own."""
        return self.nodes[first] is self.nodes[start]

    def repeat(self, start: int, end: int, copies, *, later: bool = False) -> Repeat:
        """Append one copy of nodes `start..end` per `(calls, value)` of `copies` and record them; `later`:
        as `add_copy_later` leaves them (a run makes each as its step comes; reading the graph, all)."""
        repeat = Repeat(start, end, tuple((self.add_copy_later(start, end) if later else
                                           self.add_copy(start, end, calls, value), calls, value)
                                          for calls, value in copies))
        if repeat.copies:
            self.repeats.append(repeat)
        return repeat

    def truncate(self, length: int) -> None:
        """Drop the nodes from `length` on (a trace that failed inside a session), and their copies."""
        del self.nodes[length:]
        kept = []
        for repeat in self.repeats:
            size = repeat.end - repeat.start
            copies = tuple(copy for copy in repeat.copies if copy[0] + size <= length)
            if copies:
                kept.append(Repeat(repeat.start, repeat.end, copies))
        self.repeats = kept

    def intact_repeats(self) -> list[Repeat]:
        """The recorded copies that are still what `add_copy` makes of their template: nodes are not
        changed after recording but for `saved` (a node saved after its block is saved in the template
        alone), so a copy whose saved flags differ from its template's is left out. A copy not made yet
        (`add_copy_later`) is its template's nodes: intact."""
        intact, nodes = [], self.nodes
        for repeat in self.repeats:
            template = [node.saved for node in nodes[repeat.start:repeat.end]]
            size = len(template)
            copies = tuple(copy for copy in repeat.copies if self.left(repeat.start, copy[0])
                           or [node.saved for node in nodes[copy[0]:copy[0] + size]] == template)
            if copies:
                intact.append(Repeat(repeat.start, repeat.end, copies))
        return intact

    def users(self) -> list[list[int]]:
        """For each node, the indices of the nodes that read it."""
        self.make_copies()
        users: list[list[int]] = [[] for _ in self.nodes]
        for node in self.nodes:
            for ref in node.refs():
                users[ref].append(node.index)
        return users

    def saved(self) -> list[int]:
        """Indices of the nodes whose values are kept after execution."""
        return [node.index for node in self if node.saved]

    def __str__(self) -> str:
        return "\n".join(repr(node) for node in self) or "<empty graph>"


@dataclass
class TraceSpec:
    """One trace of a request: its nodes `start..end`, its invokes' `(args, kwargs)`, its options.

    options: `mode` ("trace" or "generate"), `kwargs` (for the model's forward or `generate`),
    `early_stop`; a server checks them against its own limits.
    """

    start: int
    end: int
    invokes: list = field(default_factory=list)
    options: dict = field(default_factory=dict)
    # whether `invokes` may hold Refs (values of a session's earlier traces), to be replaced before the run: the
    # recorder that made them knows (False spares a walk of the inputs per trace); a decoded request is walked
    inputs_hold_refs: bool = field(default=True, compare=False)


@dataclass
class Request:
    """A graph and the traces that run it: one for a trace, several for a session."""

    graph: Graph
    traces: list[TraceSpec]


@dataclass
class Outcome:
    """What running a request gives back: saved values, `log` lines, and why saved values are missing."""

    results: dict = field(default_factory=dict)  # node index -> value
    logs: list = field(default_factory=list)  # (node index, values), in untrusted runs
    missing: dict = field(default_factory=dict)  # node index -> why a saved node has no value

    def __repr__(self) -> str:  # (a tensor's shape, not its numbers: an outcome may hold thousands)
        results = ", ".join(f"%{index}: {summary(value)}" for index, value in self.results.items())
        return f"Outcome(results={{{results}}}, logs={len(self.logs)}, missing={self.missing!r})"


def summary(value) -> str:
    """A value in a few words: a tensor by type, shape and dtype, a container by its length, else its repr, cut."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # a tensor (this module holds no torch)
        return f"{type(value).__name__}{list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (list, tuple, dict)):
        return f"{type(value).__name__} of {len(value)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
