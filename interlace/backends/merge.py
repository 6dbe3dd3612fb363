"""Merging: several requests run as one batched forward, each keeping its own rows (cross-user batching).

Requests that can share a forward (one trace each, with inputs, and the same mode and keyword
options) become one request: their graphs laid end to end, their invokes one batch. Each request's
nodes read and write only its invokes' rows; nodes it recorded outside an invoke (its whole batch)
get a row range of their own. `MergedInterleaver` runs the merged graph so that each request stays
alone in every way that matters: a failure fails only its request, a stop or early stop ends only
its request (the forward runs on while another needs it), a cancelled request leaves cleanly, and
a generation whose rows have all ended (an end-of-sequence token) ends at that step, as alone, and is
answered then (`on_answers`) instead of waiting for the others' steps. `split` hands each request its
own outcome, numbered as in its own graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CancelledError, InterlaceError
from ..graph import Graph, Outcome, Request, TraceSpec
from ..stream import Step
from .layout import layout_of
from .local import ENDED_EARLIER, EarlyStop, Interleaver
from .rows import Shared, SharedValueError, contains_shared
from .validate import own_nodes


@dataclass(frozen=True)
class Part:
    """Where one request lies in a merged one."""

    start: int  # its nodes: start..end of the merged graph
    end: int
    first_invoke: int  # its invokes: first_invoke .. first_invoke + invokes
    invokes: int
    rows_invoke: int  # the invoke index that stands for all of its rows


def merge_key(request: Request):
    """Requests with equal keys (and a forward of the same shape: see `Model.run_many`) can share
    one forward; None: this one runs alone."""
    if len(request.traces) != 1 or not request.traces[0].invokes:
        return None
    graph = request.graph  # (a copy of a repeated block has its template's ops)
    if any(node.op == "grad" or node.op == "call_method" and node.target == "backward"
           for node in own_nodes(graph.nodes, graph.repeats, 0, len(graph))):
        return None  # one job's backward would run through (and free) every job's autograd graph
    options = request.traces[0].options
    kwargs = options.get("kwargs", {})
    if kwargs.get("do_sample") and kwargs.get("seed") is not None:
        return None  # a seeded sample's draws depend on the rows drawn beside it: alone, as in the user's own run
    if not all(plain(value) for value in kwargs.values()):
        return None  # (a tensor's repr elides most of it: two different ones could look equal and share a run)
    if any(type(kwargs.get(name)) is int and kwargs[name] > 1 for name in ("num_beams", "num_return_sequences")):
        return None  # several rows for each prompt, which the invokes of a merged batch could not tell apart
    if kwargs.get("stop_strings") or kwargs.get("max_time") is not None:
        return None  # rows end where a merged run cannot tell (a string, the batch's own time): only end tokens can
    return options.get("mode", "trace"), repr(sorted(kwargs.items()))


def plain(value) -> bool:
    """Whether `value`'s repr is all of it (and so equal reprs mean equal options)."""
    if type(value) in (tuple, list):
        return all(plain(item) for item in value)
    return value is None or type(value) in (bool, int, float, str)


def merge(requests: list[Request]) -> tuple[Request, list[Part]]:
    """One request holding all of `requests` (which share a `merge_key`), and where each lies in it."""
    graph, invokes, parts = Graph(), [], []
    total = sum(len(request.traces[0].invokes) for request in requests)
    for number, request in enumerate(requests):
        trace = request.traces[0]
        request.graph.make_copies()  # (a server's front leaves them to the run: see Graph.add_copy_later)
        first_node, first_invoke = graph.extend_shifted(request.graph.nodes, 0), len(invokes)
        rows_invoke = total + number
        for node in graph.nodes[first_node:]:
            if node.op in ("module_value", "skip"):
                invoke = node.kwargs["invoke"]
                node.kwargs["invoke"] = rows_invoke if invoke is None else invoke + first_invoke
        invokes += trace.invokes
        parts.append(Part(first_node, len(graph), first_invoke, len(trace.invokes), rows_invoke))
    if all(request.graph.checked == len(request.graph) for request in requests):
        graph.checked = len(graph)  # (shifted copies of checked nodes: references move with them)
    options = dict(requests[0].traces[0].options)
    options["early_stop"] = all(r.traces[0].options.get("early_stop", True) for r in requests)
    return Request(graph, [TraceSpec(0, len(graph), invokes, options)]), parts


def split(interleaver: "MergedInterleaver", parts: list[Part]) -> list[Outcome | InterlaceError]:
    """Each request's outcome from a merged run (or the error that failed it), in its own numbering."""
    missing = interleaver.missing()
    return [_outcome(interleaver, number, part, missing) for number, part in enumerate(parts)]


def _outcome(interleaver: "MergedInterleaver", number: int, part: Part, missing: dict) -> Outcome | InterlaceError:
    """Part `number`'s outcome (or its error); `missing`: the run's saved nodes without a value, and why."""
    failure = interleaver.failures.get(number)
    if failure is not None:
        return _renumbered(failure, part)
    outcome = Outcome()
    outcome.results = {i - part.start: v for i, v in interleaver.results.items() if part.start <= i < part.end}
    outcome.logs = [(i - part.start, values) for i, values in interleaver.logs if part.start <= i < part.end]
    if contains_shared(outcome.results) or contains_shared(outcome.logs):
        return SharedValueError("the job saved or logged a value every job in this batch shares; "
                                "the job runs again alone, where the whole value is its own")
    outcome.missing = {i - part.start: why for i, why in missing.items() if part.start <= i < part.end}
    return outcome


def split_step(parts: list[Part], on_steps: list):
    """The step function of a merged run: each request that asked for steps gets its own rows and its
    values in its own numbering; a request that failed or was cancelled gets no more."""
    if not any(on_steps):
        return None

    def on_step(step: Step, interleaver: "MergedInterleaver") -> None:
        for number, (part, receive) in enumerate(zip(parts, on_steps)):
            if (receive is None or number in interleaver.failures or interleaver.is_cancelled(number)
                    or number in interleaver.ended):
                continue
            start, stop = interleaver.rows[part.rows_invoke]
            own = Step(step.index, step.tokens[start:stop] if step.tokens is not None else None,
                       step.text[start:stop] if step.text is not None else None,
                       {i - part.start: v for i, v in step.values.items() if part.start <= i < part.end},
                       {i - part.start: v for i, v in step.items.items() if part.start <= i < part.end})
            try:
                receive(own)
            except InterlaceError as error:  # its step could not be sent (too large): that request fails alone
                interleaver._node_failed(part.start, error)

    return on_step


def _renumbered(error: InterlaceError, part: Part) -> InterlaceError:
    if error.node is not None:
        error.node = {**error.node, "index": error.node["index"] - part.start}
    return error


class MergedInterleaver(Interleaver):
    """Runs a merged request; each part (request) fails, stops and is cancelled on its own.

    cancels: for each part, anything with `is_set()` (or None). inputs: the forward's `(args, kwargs)`, from
    which the values that hold rows are found (layout.py); a generation's are those of its first step.
    on_answers: for each part, None or what is handed its `Outcome` as soon as it has one: a part whose
    generation ended before the others' is answered at its last step (see `generation_ends`).
    """

    plain_calls_allowed = False  # every call's arguments are checked for Shared placeholders (_arguments)
    defers_copies = False  # (its parts end, and are answered, by the whole batch's bookkeeping: copies planned first)

    def __init__(self, graph: Graph, root, rows, batch_size: int, *, parts: list[Part], inputs, cancels=None,
                 on_answers=None, **options):
        # each part's whole batch is the rows of its invokes
        rows = list(rows) + [(rows[p.first_invoke][0], rows[p.first_invoke + p.invokes - 1][1]) for p in parts]
        super().__init__(graph, root, rows, batch_size, **options)
        self.shared = True
        for path in {key[0] for key in [*self.sources, *self.plan.skips]}:  # (`.source` points are made here, so
            self._module_at(path)                                           # that the layout sees them)
        self.layout = layout_of(root, inputs, batch_size)
        self.parts = parts
        self.cancels = cancels or [None] * len(parts)
        self.part_of = [0] * len(graph)
        for number, part in enumerate(parts):
            self.part_of[part.start : part.end] = [number] * (part.end - part.start)
        self.failures: dict[int, InterlaceError] = {}
        self.on_answers = on_answers or [None] * len(parts)
        self.end_tokens: frozenset = frozenset()  # a generation's end-of-sequence ids (see generation_ends)
        self.prompt_length = 0
        self.prompts = None  # the batch's prompt ids where a part's generator output can be made from its steps
        self.made: list[torch.Tensor] = []  # then: each step's tokens
        self.unfinished: list[set[int]] = []  # for each part, its rows that have made no end token yet
        self.ended: dict[int, int] = {}  # part -> the step at which all its rows had made an end token

    def is_cancelled(self, number: int | None = None) -> bool:
        """Whether part `number` was cancelled; without a number, whether every part was (nobody waits)."""
        if number is None:
            return all(self.is_cancelled(n) for n in range(len(self.parts)))
        cancel = self.cancels[number]
        return cancel is not None and cancel.is_set()

    def _execute(self, index: int) -> None:
        if self.is_cancelled(self.part_of[index]) and not self.done[index]:
            self._node_failed(index, CancelledError("the job was cancelled while it ran"))
            return
        super()._execute(index)

    def _step(self) -> None:
        """Before each call of the whole model: cancelled parts leave; once no part is left, the run ends."""
        super()._step()
        for number, (part, cancel) in enumerate(zip(self.parts, self.cancels)):
            if cancel is not None and cancel.is_set() and number not in self.failures:
                self.failures[number] = CancelledError("the job was cancelled while it ran")
                self._abandon(number, part.start, "its request failed")
        if len(self.failures) == len(self.parts):
            raise EarlyStop()

    def generation_ends(self, end_tokens, prompts: torch.Tensor, *, returns_ids: bool) -> None:
        """This run generates from `prompts` (ids, a row each), ending a row at any of `end_tokens`.
        returns_ids: generate returns the prompts and the new tokens as one tensor (not a dict of more), which a
        part that ends before the others then gets at once from its steps' tokens, as generate would make it."""
        self.end_tokens, self.prompt_length = frozenset(end_tokens), prompts.shape[1]
        self.unfinished = [set(range(*self.rows[part.rows_invoke])) for part in self.parts]
        if returns_ids and any(self.on_answers):
            self.prompts = prompts

    def step_made(self, index: int, tokens) -> None:
        """After generation step `index` chose `tokens` (one per row): a part whose rows have all made an end
        token ends at this step, as its generation alone would (generate goes on while any part's rows do).
        What waits for a later step's modules does not run, and its generator output is cut to its steps."""
        if not self.end_tokens:
            return
        if self.prompts is not None:
            self.made.append(tokens)
        chosen = tokens.tolist()
        for number, rows in enumerate(self.unfinished):
            if not rows or number in self.failures:
                continue
            rows.difference_update([row for row in rows if chosen[row] in self.end_tokens])
            if not rows:
                self.ended[number] = index
                self._abandon_later_steps(number)
                if self.prompts is not None and self.on_answers[number] is not None:
                    self._answer_now(number)

    def _answer_now(self, number: int) -> None:
        """Part `number` ended at this step: its generator output is the prompts and the tokens so far (what
        generate returns is made so); once that has run, the part is answered, unless it failed or needs a
        value of a later step. An untrusted run checks the weights' versions first, as it does at its end."""
        part = self.parts[number]
        output = torch.cat([self.prompts, torch.stack(self.made, 1).to(self.prompts.device)], 1)
        for key in [key for key in self.sources if key[0] in self.extra_modules and key[1] == "output"]:
            own = [index for index in self.sources[key] if part.start <= index < part.end]
            if own:
                self.sources[key] = [index for index in self.sources[key] if not part.start <= index < part.end]
                self._event(key, output, own)
        if number in self.failures or not all(self.done[part.start : part.end]):
            return
        if self.untrusted:
            self.guard.check_versions()
        answer = _outcome(self, number, part, self.missing())
        if isinstance(answer, Outcome):
            self.on_answers[number](answer)

    def _abandon_later_steps(self, number: int) -> None:
        """Part `number`'s generation ended: its nodes that wait for a module's later call (and all that read
        them) are done without running; the generator's output (and what reads only it) still comes."""
        part, done, users = self.parts[number], self.done, self.plan.users
        later = set()
        for index in range(part.start, part.end):
            if done[index]:
                continue
            node = self.nodes[index]
            if index in later or node.op == "module_value" and node.target not in self.extra_modules:
                later.add(index)
                later.update(users[index])  # (users come later in the graph: reached in this loop)
        for index in sorted(later):
            if not done[index]:
                self._finish(index, None, ran=False, why=ENDED_EARLIER)

    def _op_module_value(self, node):
        value = super()._op_module_value(node)
        ended = self.ended.get(self.part_of[node.index])
        if ended is not None and node.target in self.extra_modules and node.kwargs["kind"] == "output":
            if type(value) is not torch.Tensor:
                raise SharedValueError("the generation's output of a job whose rows ended before the others' cannot "
                                       "be cut to its own steps here; the job runs again alone")
            value = value[:, : self.prompt_length + ended + 1]  # (generate padded its rows for the later steps)
        return value

    def _batched(self, path: str, kind: str):
        if path in self.extra_modules:  # interlace's own (a generator): its values are batch-first
            return None
        return self.layout.batched(path, kind)

    def _resolve(self, obj):
        """A `Shared` placeholder may be held in containers and moved by indexing, never used itself."""
        return _no_shared(super()._resolve(obj))

    def _arguments(self, node):
        args, kwargs = super()._arguments(node)
        return _no_shared(args), _no_shared(kwargs)

    def _op_module_call(self, node):
        if node.kwargs.get("hook"):
            raise SharedValueError("a module call with hook=True would run every job's interventions on this "
                                   "job's values; the job runs again alone")
        return super()._op_module_call(node)

    def _node_failed(self, index: int, error: InterlaceError) -> None:
        """Only this node's part fails: its nodes are done (not run), the others go on."""
        number = self.part_of[index]
        self.failures.setdefault(number, error)
        self._abandon(number, self.parts[number].start, "its request failed")

    def _op_stop(self, node):
        if node.kwargs.get("session"):
            return super()._op_stop(node)
        self._abandon(self.part_of[node.index], node.index + 1,
                      "the trace stopped (tracer.stop() or an early stop) before it was computed")
        return None  # the forward runs on for the other parts; it stops early once all are done

    def _abandon(self, number: int, start: int, why: str) -> None:
        for index in range(start, self.parts[number].end):
            if not self.done[index]:
                self._finish(index, None, ran=False, why=why)


def _no_shared(value):
    """`value`, unless it is (or directly holds) a `Shared` placeholder: then the operation is refused."""
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else (value,)
    for item in items:
        if isinstance(item, Shared):
            raise item.refuse("this operation")
    return value
