"""Planning: what each node of a graph waits for, in one linear pass.

For the span of nodes a run executes, `Plan` works out each node's dependencies (the nodes it reads,
the in-place changes recorded before it to a value it reads, the previous `stop`), who reads each
node (so values are freed after their last reader), which module event ("layer 3, output, call 0")
each module value belongs to, and which nodes are ready before the model runs. Every step is linear
in the size of the graph: a `stop` waits only for the nodes since the previous one, and each view
knows its module event from the node it views, so 100,000 nodes of any mix plan in well under a
second.
"""

from __future__ import annotations

from collections import deque

from .. import ops
from ..graph import Graph, Ref, StoreBack, basic_index, item_updated

VIEW_TARGETS = frozenset({"operator.getitem", "builtins.getattr"})


class Plan:
    """The dependencies of nodes `start..end` of `graph`; nodes before `start` ran earlier.

    defer_copies: plan the copies of a generation's block over steps (`Graph.repeats`) when their step
    comes (`plan_copies`), not all before the first token, where nothing after the block depends on
    their order (see `_deferrable`); `deferred` lists them.
    """

    # (slots: past 30 attributes an instance's dict no longer shares its keys with the other instances', so
    # each trace would build one and grow it four times: ~10 % of an empty trace's cache misses, misses.py)
    __slots__ = (
        "graph", "nodes", "start", "end", "users", "waiting", "remaining", "event_keys", "_earlier_keys", "sources",
        "mutations", "skips", "saved", "needs_grad", "sets_requires_grad", "gradients", "row_zero", "writes",
        "reads", "plain_calls", "stores_back", "ready", "deferred", "_outside", "_last_mutation", "_previous_stop",
        "_previous_backward", "_waiting_grads", "_previous_log", "kept", "edits", "_template", "units",
    )

    def __init__(self, graph: Graph, start: int, end: int, *, defer_copies: bool = False):
        found = _deferrable(graph, start, end) if defer_copies and graph.repeats else None
        if found is None and not graph.copies_made:
            graph.make_copies()  # (a server's front leaves them to the run: see Graph.add_copy_later)
        self.graph = graph
        nodes = self.nodes = graph.nodes
        self.start, self.end = start, end
        # indexed by node; only nodes of the span have readers to wake (a session plans each trace)
        self.users: list = [()] * end  # (a list for each node once it has a reader: most have none)
        self.waiting = [0] * end  # dependencies not yet finished
        self.remaining = [0] * end  # readers not yet finished: the value is freed at zero
        self.event_keys: list = [None] * end  # module event a value of the span is (a view of), or None
        self._earlier_keys: dict[int, object] = {}  # the same for nodes of earlier traces that are viewed
        self.sources: dict[tuple, list[int]] = {}  # module event -> its module_value nodes
        self.mutations: dict[tuple, list[int]] = {}  # module event -> in-place changes of it
        self.skips: dict[tuple, int] = {}  # (path, call) -> skip node
        # (by position: a copy not made yet has its template's nodes, whose flags are its own)
        self.saved = set()
        for index, node in enumerate(nodes[start:end], start):  # (a loop: a comprehension is a call, on cold caches)
            if node.saved:
                self.saved.add(index)
        self.needs_grad = False
        self.sets_requires_grad = False  # a `requires_grad_()` call: the run puts the parameters' flags back
        self.gradients: dict[int, list[int]] = {}  # backward call -> the grad nodes it computes
        self.row_zero: set[int] = set()  # `module.output[0]` nodes (a tuple's first item, or batch row 0?)
        self.writes: set[int] = set()  # nodes that change their first argument in place
        self.reads: list = [()] * end  # for each node of the span, the nodes of the span it reads
        self.plain_calls: set[int] = set()  # calls of registered operations with nothing else to check
        self.stores_back: dict[int, int] = {}  # `x[k] op= y`: its setitem -> its getitem (see _store_back)
        self.units: set[int] = set()  # the setitems of those `_add_edit` planned (with their two nodes) at once
        self.ready: list[int] = []  # ready before the model runs, in graph order
        # copies planned later: (their first module call, first node, stop, module calls moved by, step), in
        # graph order; a deque only where there are some (an empty one allocates a block of 64: ~2 % of a trace's
        # cache misses, misses.py)
        self.deferred: deque[tuple[int, int, int, int, int]] | tuple = ()
        self._outside: dict[int, int] = {}  # nodes before a deferred block read by its copies: readers per copy
        # what planning carries from node to node (a deferred copy goes on from where it stopped)
        self._last_mutation: dict[int, int] = {}
        self._previous_stop = start
        self._previous_backward, self._waiting_grads = None, []
        self._previous_log = None  # log lines come out in the order written
        if found is None:
            if start < end:
                self._add(start, end, self.ready)
        else:
            repeat, outside, first_call = found
            size = repeat.end - repeat.start
            self._template = (repeat.start, repeat.end)
            self.deferred = deque((first_call + calls, first, first + size, calls, value)
                                  for first, calls, value in repeat.copies)
            self._add(start, repeat.end, self.ready)
            self._add(self.deferred[-1][2], end, self.ready)
            # a value the copies read lives until the last of them has run, planned or not
            self._outside = outside
            for ref, count in outside.items():
                self.remaining[ref] += count * len(self.deferred)
        # output events whose module values are read whole by nothing of the graph (saved, most often):
        # the hook keeps the value and wakes no one (the commonest event, done without the general path);
        # by path, then call (a hook looks its call up by number: no key is made, or hashed, per call)
        self.kept: dict[str, dict[int, list[int]]] = {}
        # output events whose only work is one edit of the module's value by a constant (see `_edit`), the same way
        self.edits: dict[str, dict[int, tuple]] = {}
        if self.sources:
            self._shortcuts(self.sources)

    def plan_copies(self, call: int, done) -> list[int]:
        """Plan the deferred copies whose module calls begin at or before `call` (`done`: the nodes
        that ran); returns their nodes that are ready now."""
        ready: list[int] = []
        while self.deferred and self.deferred[0][0] <= call:
            _, first, stop, calls, value = self.deferred.popleft()
            begin, end = self._template
            self.graph.make_copy(begin, end, first, calls, value)
            self._add(first, stop, ready, done)
            for ref, count in self._outside.items():  # (counted when the plan was made)
                self.remaining[ref] -= count
            self._shortcuts({self.event_keys[index] for index in range(first, stop)
                             if self.nodes[index].op == "module_value"})
        return ready

    def _shortcuts(self, keys) -> None:
        """Note which of the events `keys` the hooks do without the general path (`kept`, `edits`)."""
        users, nodes, sources, all_kept, all_edits = self.users, self.nodes, self.sources, self.kept, self.edits
        for key in keys:
            path, kind, call = key
            if kind != "output":
                continue
            indices = sources[key]
            kept, edits = all_kept.get(path), all_edits.get(path)
            if kept is not None:
                kept.pop(call, None)
            if edits is not None:
                edits.pop(call, None)
            changes = self.mutations.get(key)
            if changes is None:
                for i in indices:  # (a loop, not all(...): no generator made for each event)
                    if users[i] or nodes[i].guard is not None:
                        break
                else:
                    if kept is None:
                        kept = all_kept[path] = {}
                    kept[call] = indices
            else:
                read = []
                for i in indices:
                    if users[i] or nodes[i].guard is not None:
                        read.append(i)
                edit = self._edit(read[0], indices, changes) if len(read) == 1 else None
                if edit is not None:
                    if edits is None:
                        edits = all_edits[path] = {}
                    edits[call] = edit

    def _edit(self, first: int, values: list[int], changes: list[int]):
        """`(values, (getitem, operator, setitem), k, operator, c)` where the only nodes that read module value
        `first` are those of `x[k] op= c` (`out[:, -1] += steer`), and `(values, (setitem,), k, None, c)` where
        it is `x[k] = c` (`out[:, 0] = 0`), with `c` a constant, no cond, and nothing else reading what they make;
        the event's other module values `values` (`first` among them) are read by nothing (saved: their value
        is the module's edited one, whether recorded before the edit or after). Else None. The hook then does
        the edit itself, as the general path would do it node by node."""
        users, waiting, nodes, plain, saved = self.users, self.waiting, self.nodes, self.plain_calls, self.saved
        store = changes[-1]
        node = nodes[store]
        unit = store in self.units  # (then what _add_edit checked holds: its guard, the calls, the constant, ...)
        if (nodes[first].guard is not None or users[store] or store in saved
                or not unit and (node.guard is not None or store not in plain)):
            return None
        edit = None
        if len(changes) == 1 and users[first] == [store] and _constant(node, 2):
            edit = tuple(values), (store,), node.args[1], None, node.args[2]
        read, update = store - 2, store - 1
        if (len(changes) == 2 and changes[0] == update and users[first] == [read, store]
                and users[read] == [update, store] and users[update] == [store] and read not in saved
                and update not in saved and (unit or self.stores_back.get(store) == read and waiting[read] == 1
                                             and waiting[update] == 1 and read in plain and update in plain
                                             and _constant(nodes[update], 1))):
            operator = nodes[update]
            edit = (tuple(values), (read, update, store), node.args[1], ops.FUNCTIONS[operator.target][0],
                    operator.args[1])
        if edit is not None and self._outside and not self._outside.keys().isdisjoint([*edit[0], *edit[1]]):
            return None  # (copies of a block not planned yet read one of its values: it must outlive the event)
        return edit

    def _add(self, first: int, stop: int, ready: list, done=None) -> None:
        """Plan nodes `first..stop`, in graph order, after those planned so far; a node with nothing
        to wait for (`done`: nodes that ran already) is appended to `ready`."""
        nodes, start = self.nodes, self.start
        last_mutation = self._last_mutation
        users, waiting, remaining, event_keys = self.users, self.waiting, self.remaining, self.event_keys
        mutating, functions, sources = ops.MUTATING_TARGETS, ops.FUNCTIONS, self.sources
        planned_to = first  # nodes before it are planned already (the last two of an `x[k] op= c`: see _add_edit)
        for node in nodes[first:stop]:
            index, op = node.index, node.op
            if op == "module_value" and node.guard is None:  # (the commonest node: it reads nothing, and it is
                key = event_keys[index] = _module_event(node)  # ready in its module's event, not before)
                sources.setdefault(key, []).append(index)
                continue
            if index < planned_to:
                continue
            if op == "call" and node.target == "operator.getitem" and done is None and self._add_edit(index, stop):
                planned_to = index + 3
                continue
            refs = node._refs or node.refs()  # (the recorder's, read without a call; () asks again, harmlessly)
            reads = self.reads[index] = [ref for ref in refs if ref >= start] if start else refs
            if op == "call" and node.target == "operator.setitem" and index - 2 >= start and _store_back(nodes, index):
                self.stores_back[index] = index - 2
                reads = self.reads[index] = (*reads, index - 2)  # the getitem's value lives until then
            for ref in reads:
                remaining[ref] += 1
            deps = reads
            if op == "stop":  # everything recorded since the previous stop (which waits for the rest)
                deps = range(self._previous_stop, index)
                self._previous_stop = index
            else:
                # a read waits for the in-place changes recorded before it
                extra = []
                if last_mutation and not last_mutation.keys().isdisjoint(reads):
                    for ref in reads:  # (a loop, not a comprehension: that is a call, on cold caches)
                        if ref in last_mutation:
                            extra.append(last_mutation[ref])
                if op == "call_method" and node.target == "backward":
                    # each .grad recorded since the previous backward is this one's; a backward runs
                    # after the previous one has finished, never inside its gradient hooks
                    self.gradients[index], self._waiting_grads = self._waiting_grads, []
                    extra += [nodes[g].args[0].index for g in self.gradients[index] if nodes[g].args[0].index >= start]
                    if self._previous_backward is not None:
                        extra.append(self._previous_backward)
                    self._previous_backward = index
                elif op == "log":
                    if self._previous_log is not None:
                        extra.append(self._previous_log)
                    self._previous_log = index
                if extra:
                    deps = list(dict.fromkeys([*reads, *extra]))
            if done is not None:  # (a deferred copy: what ran already is not waited for)
                deps = [dep for dep in deps if not done[dep]]
            for dep in deps:
                readers = users[dep]
                if readers:
                    readers.append(index)
                else:
                    users[dep] = [index]
            waiting[index] = len(deps)
            mutates = False  # whether it changes its first argument in place
            if op == "call":  # (most nodes: their checks first, each once)
                target = node.target
                if target in VIEW_TARGETS:  # a view has its module event; other calls make new values
                    viewed = node.args[0] if node.args else None
                    if type(viewed) is Ref:
                        viewed = viewed.index
                        event_keys[index] = event_keys[viewed] if viewed >= start else self._earlier_key(viewed)
                if target == "operator.getitem" and _reads_row_zero(nodes, node):
                    self.row_zero.add(index)
                elif type(target) is str and target in functions:
                    self.plain_calls.add(index)
                mutates = target in mutating
            elif op == "module_value":
                key = event_keys[index] = self._event_key(node)
                sources.setdefault(key, []).append(index)
                continue  # (ready only in its module's event)
            else:
                event_keys[index] = self._event_key(node)
                if op == "skip":
                    self.skips[(node.target, node.kwargs["call"])] = index
                elif op == "grad" or (op == "call_method" and node.target == "backward"):
                    self.needs_grad = True
                    if op == "grad":
                        self._waiting_grads.append(index)
                elif op == "call_method" and node.target in ops.AUTOGRAD_METHODS:
                    self.sets_requires_grad = True
                mutates = op == "call_method" and ops.is_in_place_method(node.target)
            if mutates:  # later reads of what it changes wait for it, and so does the end of that value's module
                self.writes.add(index)  # event, if it is (a view of) a module's value
                changed = node.args[0] if node.args else None
                if type(changed) is Ref:
                    last_mutation[changed.index] = index
                    changed_key = event_keys[changed.index]
                    if changed_key is not None:
                        self.mutations.setdefault(changed_key, []).append(index)
            if not deps:
                ready.append(index)

    def _add_edit(self, read: int, stop: int) -> bool:
        """Plan nodes `read..read+2` at once where they are `v = x[k]; v op= c; x[k] = v` (what `x[k] op= c` records,
        see `_store_back`: a steering edit, the commonest three nodes), with `x` a value of the span nothing has
        changed in place yet, `k` a basic index other than an int, `c` a constant and no guard: as `_add` plans them
        one by one (the tests compare the two), without its checks for what these nodes are not. False, with
        nothing planned, where they are not such nodes."""
        nodes, update, store = self.nodes, read + 1, read + 2
        # (a StoreBack is the recorder's word that _store_back holds: see Recorder.store)
        if store >= stop or not (type(nodes[store]) is StoreBack or _store_back(nodes, store)):
            return False
        get, setitem = nodes[read], nodes[store]
        x = get.args[0].index
        if (x < self.start or setitem.guard is not None or x in self._last_mutation or type(get.args[1]) is int
                or get.kwargs or setitem.kwargs or not _constant(nodes[update], 1)):
            return False
        users, remaining, waiting, reads = self.users, self.remaining, self.waiting, self.reads
        # the getitem reads x; the operator reads the getitem's view and writes it; the setitem reads x, the
        # operator's result and (kept alive until then: see stores_back) the view
        readers = users[x]
        if readers:
            readers += (read, store)
        else:
            users[x] = [read, store]
        users[read], users[update] = [update, store], [store]
        reads[read], reads[update], reads[store] = (x,), (read,), (x, update, read)
        remaining[x] += 2
        remaining[read] += 2
        remaining[update] += 1
        waiting[read] = waiting[update] = 1
        waiting[store] = 3
        key = self.event_keys[read] = self.event_keys[x]
        if key is not None:
            self.mutations.setdefault(key, []).extend((update, store))
        self._last_mutation[read], self._last_mutation[x] = update, store
        self.stores_back[store] = read
        self.units.add(store)
        self.plain_calls.update((read, update, store))
        self.writes.update((update, store))
        return True

    def _event_key(self, node):
        """The module event whose value `node` is or views (getitem/getattr of one), else None."""
        op = node.op
        if op == "module_value":
            return _module_event(node)
        if op == "grad":
            return ("grad", node.index)
        if _is_view(node):
            viewed = node.args[0].index
            return self.event_keys[viewed] if viewed >= self.start else self._earlier_key(viewed)
        return None

    def _earlier_key(self, index: int):
        """The event key of node `index` of an earlier trace: found by following its views back, once."""
        chain = []
        while index not in self._earlier_keys and _is_view(self.nodes[index]):
            chain.append(index)
            index = self.nodes[index].args[0].index
        if index not in self._earlier_keys:
            self._earlier_keys[index] = self._event_key(self.nodes[index])  # not a view: no recursion
        for viewing in chain:
            self._earlier_keys[viewing] = self._earlier_keys[index]
        return self._earlier_keys[index]


# what a deferred copy may hold: no op that waits for, or orders, what was recorded before it (stop, log,
# backward), and nothing that calls a module (its hooks would plan copies while this one is being planned)
_DEFERRABLE = frozenset({"call", "call_method", "module_value", "cond", "swap", "parameter", "apply"})


def _deferrable(graph: Graph, start: int, end: int):
    """`(repeat, outside, first call)` where the copies of the graph's one block over steps can be planned as
    their steps come, else None. `outside`: the nodes before the block its nodes read, and how often.

    Planned late, a copy is planned after the nodes that follow the copies, so none of those may read a copy's
    value (a later block over steps reads its own step's) or depend on the copies' order: read (or wait for)
    a value the block changes in place (a list it appends to), change a value the block reads, or be a
    `stop`. The copies follow the block, in step order; a value the block changes is not a module's (whose
    event would end before a later copy is planned)."""
    if start or len(graph.repeats) != 1:
        return None
    repeat = graph.repeats[0]
    nodes, begin, size = graph.nodes, repeat.start, repeat.end - repeat.start
    copies = repeat.copies
    if not copies or copies[-1][0] + size > end or any(
            first != repeat.end + number * size or (number and calls < copies[number - 1][1])
            for number, (first, calls, _) in enumerate(copies)):
        return None
    outside: dict[int, int] = {}
    changed: set[int] = set()
    calls = []
    for node in nodes[begin : repeat.end]:
        op = node.op
        if op not in _DEFERRABLE or op == "call_method" and (node.target == "backward"
                                                               or node.target in ops.AUTOGRAD_METHODS):
            return None
        if op == "module_value":
            calls.append(node.kwargs["call"])
        for ref in node.refs():
            if ref < begin:
                outside[ref] = outside.get(ref, 0) + 1
        target = node.args[0].index if op == "swap" and type(node.args[0]) is Ref else _changed(node)
        if target is not None and target < begin:
            if op == "swap" or nodes[target].op == "module_value" or _is_view(nodes[target]):
                return None
            changed.add(target)
    if not calls:
        return None
    end_copies = copies[-1][0] + size  # (they begin where the block ends)
    for node in nodes[end_copies:end]:
        target, refs = _changed(node), node.refs()
        if node.op == "stop" or not changed.isdisjoint(refs) or target is not None and target in outside or any(
                repeat.end <= ref < end_copies for ref in refs):  # (a later block reading a copy's value)
            return None
    return repeat, outside, min(calls)


def _changed(node) -> int | None:
    """The node whose value `node` changes in place, if it changes one."""
    op = node.op
    if ((op == "call" and node.target in ops.MUTATING_TARGETS) or (op == "call_method" and ops.is_in_place_method(
            node.target))) and node.args and type(node.args[0]) is Ref:
        return node.args[0].index
    return None


def _store_back(nodes, index: int) -> bool:
    """Whether nodes index-2..index are what `x[k] op= y` records: `v = x[k]`, `v op= y` (an in-place
    operator: `+=`, `*=`, ...) and `x[k] = v`, with the same basic index `k` (ints, slices, None, ...).

    On a tensor `x`, `x[k]` is then a view of `x` and the operator wrote through it, so when the
    operator returned `v` itself the setitem would copy memory onto itself: it is skipped."""
    store = nodes[index]
    args = store.args
    if len(args) != 3 or type(args[2]) is not Ref or args[2].index != index - 1 or type(args[0]) is not Ref:
        return False
    return (item_updated(nodes, index - 1, args[0].index, store.guard) and basic_index(args[1])
            and nodes[index - 2].args[1] == args[1])


def _constant(node, position: int) -> bool:
    """Whether the argument at `position` of call `node` (`c` of `x[k] = c`, `v += c`) is no node's value, and
    nothing else of the call but its first argument is."""
    args = node.args  # (args[1] and args[-1] are all the arguments after the first: there are 2 or 3)
    return (len(args) == position + 1 and not node.kwargs and type(args[0]) is Ref and len(node.refs()) == 1
            and node._shallow and type(args[1]) is not Ref and type(args[-1]) is not Ref)


def _module_event(node) -> tuple:
    """The event of module value `node`: (module path, "output" or "input" (`.inputs` too), call)."""
    kwargs = node.kwargs
    return (node.target, "output" if kwargs["kind"] == "output" else "input", kwargs["call"])


def _reads_row_zero(nodes, node) -> bool:
    """`module.output[0]`: a tuple's first item, or (transformers 5) row 0 of a batch-first tensor."""
    args = node.args
    return (len(args) == 2 and type(args[1]) is int and args[1] == 0 and type(args[0]) is Ref
            and nodes[args[0].index].op == "module_value" and nodes[args[0].index].kwargs["kind"] == "output")


def _is_view(node) -> bool:
    """A getitem or getattr of a value: its module event is that value's."""
    return node.op == "call" and node.target in VIEW_TARGETS and bool(node.args) and type(node.args[0]) is Ref

