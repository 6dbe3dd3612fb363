"""Streaming: a run that hands out each generation step as it finishes (`stream=True`).

A `Step` is what one generation step produced: each row's token, the text it adds, and the values
saved during that step. `Stream` hands out the steps of a traced run started when its `with` block
ends (here: the run goes to a thread, started at the first read, that makes each step while its reader
waits for it; remotely: the job is submitted then and its events carry the steps) and `tracer.stream()`
yields them as they come. After the last step the saved values bind as after any trace. Leaving the loop
early (break, an exception, Ctrl-C) stops the run at its next step, and nothing binds.
"""

from __future__ import annotations

import queue
import threading

import torch

from .errors import InterlaceError, NotSavedError, describe_location
from .graph import Outcome, Request
from .proxy import Proxy

_DONE = object()  # what the run thread puts last (with its outcome or error)


class Step:
    """One generation step: `index`, each row's `tokens` (a tensor of token ids, one per row, or None
    for a single forward) and `text` (each row's new text, or None without a tokenizer), and the values
    saved during the step, read by their proxies: `step[h]` is the value of `h` in this step (`h`
    saved in `tracer.all()` or `tracer.iter[...]`: this step's copy), `step[items]` the items an
    `interlace.list()` gained in it.

    >>> import interlace, transformers
    >>> config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20)
    >>> lm = interlace.LanguageModel(transformers.GPT2LMHeadModel(config), tokenizer=None)
    >>> with lm.generate([[1, 2, 3]], max_new_tokens=3, stream=True, pad_token_id=0) as tracer:
    ...     with tracer.all():
    ...         last = lm.transformer.h[0].output[:, -1].save()
    >>> [(step.index, tuple(step[last].shape)) for step in tracer.stream()]
    [(0, (1, 8)), (1, (1, 8)), (2, (1, 8))]
    """

    def __init__(self, index: int, tokens=None, text=None, values=None, items=None):
        self.index, self.tokens, self.text = index, tokens, text
        self.values: dict = values or {}  # node index -> value saved in this step
        self.items: dict = items or {}  # node index of a saved list -> the items it gained in this step
        self.copies: list = []  # the tracer's repeated blocks: (start, end, {step: first node of its copy})

    def __repr__(self) -> str:
        return f"Step({self.index}, tokens={self.tokens!r}, text={self.text!r}, values={sorted(self.values)})"

    def __getitem__(self, proxy: Proxy):
        if not isinstance(proxy, Proxy):
            raise InterlaceError(f"a step is read with a proxy saved in the trace (step[h]), not {type(proxy).__name__}")
        index = self.node_of(proxy._index)
        if index in self.items:
            return self.items[index]
        if index in self.values:
            return self.values[index]
        node = proxy._tracer.graph[proxy._index]  # named by what it is and the user's line, not its number
        where = describe_location(node.location)
        where = f" ({where})" if where else ""
        raise NotSavedError(f"{node.describe()}{where} has no value saved in step {self.index}: save it in a block "
                            "that runs at this step (tracer.all(), tracer.iter[...]); a value of the first forward "
                            "only is in step 0, one of the whole run (generator.output) binds after the last step")

    def node_of(self, index: int) -> int:
        """The node that stands for node `index` in this step (its copy, when a repeated block holds it)."""
        for start, end, firsts in self.copies:
            if start <= index < end and self.index in firsts:
                return index - start + firsts[self.index]
        return index


class Stream:
    """The run of a `stream=True` trace, set up when its block ends; `steps()` yields its `Step`s."""

    def __init__(self, tracer, request: Request):
        self.tracer = tracer
        self.started = False
        self.stopped = False  # the reader left before the last step
        self.cancel = threading.Event()
        options = tracer.options
        if options.get("remote"):  # submitted now: the job, and a generator of its steps returning the outcome
            tracer.job, steps = tracer.model.submit(request, options)
            self.remote = steps if options.get("mode") == "generate" else _whole_at_end(steps)
            self.thread = None
            return
        self.queue: queue.Queue = queue.Queue()
        # The run and its reader take turns: the run makes a step only while its reader waits for one, with
        # torch's random generators in the run's own state, so draws in the reader's loop neither change the
        # run's tokens nor are changed by them. The run's state starts as torch's is when the reader first asks
        # (set in _local): a stream read after another one's end samples on from where that one's draws left
        # torch's generators, as runs without streaming do, not again from the same state.
        self.turn = threading.Semaphore(0)
        self.random: _RandomState | None = None  # the run's state while the reader has the turn
        self.reader: _RandomState | None = None  # the reader's state while the run makes a step
        # started by the reader's first ask: a stream never read leaves no thread waiting for it forever
        self.thread = threading.Thread(target=self._run, args=(request,), name="interlace-stream", daemon=True)

    def _run(self, request: Request) -> None:
        start = self.random
        self._take_turn()
        try:
            outcome = self.tracer.model.submit(request, self.tracer.options, on_step=self._hand_over,
                                               cancel=self.cancel)
            last = [_DONE, outcome, None]
        except BaseException as error:  # noqa: BLE001 - handed to the reader, raised there
            last = [_DONE, None, error]
        # torch's generators stay where the run left them when it drew from them (as without streaming, so the
        # next run samples anew); otherwise (greedy, or seed=, which puts them back) where the reader left them
        if _RandomState() == start:
            self.reader.restore()
        if last[1] is not None and self.tracer.options.get("mode") != "generate":
            self.queue.put(_whole(last[1]))  # one forward: one step, holding every value
        self.queue.put(tuple(last))

    def _take_turn(self) -> None:
        """In the run: wait until the reader asks for a step, then swap in the run's random state."""
        self.turn.acquire()
        self.reader = _RandomState()
        self.random.restore()

    def _hand_over(self, step: Step) -> None:
        """In the run: give the reader its step and the turn; the model is free for the reader's own traces
        until the reader asks for the next step."""
        self.random = _RandomState()
        self.reader.restore()
        running = self.tracer.model._running
        running.release()
        self.queue.put(step)
        self._take_turn()
        running.acquire()

    def steps(self, frame):
        """Yield each step as it is produced; then bind the saved values in the names of `frame`."""
        if self.started:
            raise InterlaceError("tracer.stream() can be read once: keep the steps you need as they come")
        self.started = True
        finished = False
        source = self.remote if self.thread is None else self._local()
        try:
            while True:
                try:
                    step = next(source)
                except StopIteration as end:
                    outcome = end.value
                    break
                step.copies = self.tracer.copies
                yield step
            finished = True
            self.tracer._receive(outcome, frame)
        finally:
            if not finished:
                self._stop()

    def _local(self):
        self.random = _RandomState()
        self.thread.start()
        while True:
            self.turn.release()  # the run makes its next step while the reader waits here
            item = self.queue.get()
            if isinstance(item, Step):
                yield item
                continue
            self.thread.join()  # (its last act was this put): no thread is left once the last step is given
            _, outcome, error = item
            if error is not None:
                raise error
            return outcome

    def unbound(self) -> str:
        """Why a saved value of the run has not bound (it binds after the last step)."""
        if self.stopped:
            return "the loop over tracer.stream() ended before the last step, which stopped the run: nothing binds"
        return "a streamed run's saved values bind when the loop over tracer.stream() ends, after its last step " \
               "(inside the loop, read them as step[value]; two streams read side by side with zip() end at the " \
               "shorter, and the other's loop has not ended)"

    def _stop(self) -> None:
        """The reader left early: the run stops at its next step; wait for it so the model is as it was."""
        self.stopped = True
        self.cancel.set()
        if self.thread is not None:
            if self.thread.ident is None:  # never started: nothing to stop
                return
            self.turn.release()  # (a run waiting for its turn goes on to its cancelled next step)
            self.thread.join()
        else:
            self.remote.close()  # cancels the job


class _RandomState:
    """The state of torch's random generators: the CPU one, and each CUDA device's once CUDA is in use."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda:
            torch.cuda.set_rng_state_all(self.cuda)

    def __eq__(self, other) -> bool:
        return (isinstance(other, _RandomState) and torch.equal(self.cpu, other.cpu)
                and len(self.cuda) == len(other.cuda) and all(map(torch.equal, self.cuda, other.cuda)))


def _whole_at_end(steps):
    """A single forward's remote steps (none come): its one step, holding every value, once it is done."""
    outcome = yield from steps
    yield _whole(outcome)
    return outcome


def _whole(outcome: Outcome) -> Step:
    values = {i: v for i, v in outcome.results.items() if type(v) is not list}
    return Step(0, values=values, items={i: v for i, v in outcome.results.items() if type(v) is list})
