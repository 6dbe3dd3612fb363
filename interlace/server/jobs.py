"""Jobs: what a submitted request becomes, the bounded queue it waits in, the worker that runs it.

A `Job` holds one request, whose key submitted it, its state (`queued`, `running`, `completed`,
`error`, `cancelled`), its events (what `GET /v1/jobs/{id}/events` streams), and in the end its
result bytes or its error body. Events are published from any thread and awaited on the event loop.

`JobQueue` is bounded (a full queue refuses with 429) and tells every waiting job its position when
it moves. One `Worker` thread per hosted model instance takes from its queue a batch of jobs that
can share one forward (same group, within the server's bounds on jobs and token positions) and hands
it to `execute`, which runs them together, each on its own rows (hooks sit on the shared module: two
batches at once would see each other's activations). The store of jobs (by id, in SQLite) is `store.py`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import threading
import time
from collections import deque

from ..errors import CancelledError, ServiceError
from .errors import error_body

log = logging.getLogger("interlace.server")

FINISHED = frozenset({"completed", "error", "cancelled"})
STARTED = FINISHED | {"running"}  # out of the queue


class Job:
    """One request on its way through the server; created on the event loop's thread."""

    def __init__(self, request, *, key: str, model: str, limits, loop: asyncio.AbstractEventLoop, data: bytes = b"",
                 batching=None, job_id: str | None = None, stream: bool = False):
        self.id = job_id or secrets.token_urlsafe(16)  # random: ids cannot be guessed, only received
        self.request, self.key, self.model, self.limits = request, key, model, limits
        self.data = data  # the request's bytes as received (a runner in another process sends them on)
        # what gives (group, size): jobs of one group may share a forward; size: its token positions. Asked
        # the first time a batch needs them (a job alone in the queue never does: its prompt is not tokenized
        # here, ahead of its first token); None: it runs alone
        self.batching = batching
        self._grouped: tuple | None = None
        self.stream = stream  # publish a `step` event per generation step
        self.state = "queued"
        self.position: int | None = None
        self.created, self.started, self.finished = time.time(), None, None
        self.result: bytes | None = None
        self.missing: dict = {}  # saved nodes without a value, and why
        self.error: dict | None = None  # {code, message, node, hint} and its status
        self.status = 200
        self.events: list[tuple[str, dict]] = []
        self.cancel = threading.Event()  # the executor checks it between operations
        self._loop = loop
        self._changed = asyncio.Event()
        self._lock = threading.Lock()
        self.on_change = None  # set by the store: called when the job starts, and once when it is finished

    @property
    def group(self):
        return self._grouping()[0]

    @property
    def size(self) -> int:
        return self._grouping()[1]

    def _grouping(self) -> tuple:
        if self._grouped is None:
            try:
                self._grouped = self.batching() if self.batching is not None else (None, 1)
            except Exception:  # noqa: BLE001 - (asked in the worker's thread) it runs alone, and its run says why
                log.exception("finding the batching group of job %s failed; it runs alone", self.id)
                self._grouped = (None, 1)
        return self._grouped

    def info(self) -> dict:
        return {"id": self.id, "model": self.model, "state": self.state, "position": self.position,
                "created": self.created, "started": self.started, "finished": self.finished,
                "error": self.error, "missing": {str(k): v for k, v in self.missing.items()}}

    # -- state changes (any thread) -------------------------------------------------------------
    def publish(self, kind: str, **data) -> None:
        with self._lock:
            self.events.append((kind, data))
        self._loop.call_soon_threadsafe(self._wake)

    def publish_step(self, event: dict) -> None:
        self.publish("step", **event)

    def queued(self, position: int) -> None:
        self.position = position
        self.publish("queued", position=position)

    def running(self) -> None:
        if self.state != "queued":  # (finished already, or said before)
            return
        self.state, self.position, self.started = "running", None, time.time()
        self.publish("running")
        if self.on_change is not None:
            self.on_change(self)

    def complete(self, result: bytes, logs, missing: dict) -> None:
        if self.state in FINISHED:  # cancelled while it ran (its key revoked, say): the answer is dropped
            return
        self.result, self.missing = result, missing
        for index, values in logs:
            self.publish("log", node=index, text=" ".join(map(str, values)))
        self._finish("completed")

    def fail(self, error: Exception, status: int) -> None:
        if self.state in FINISHED:
            return
        self.error, self.status = error_body(error), status
        self._finish("cancelled" if isinstance(error, CancelledError) else "error", **self.error)

    def _finish(self, state: str, **data) -> None:
        with self._lock:
            if self.state in FINISHED:
                return
            self.state, self.position, self.finished = state, None, time.time()
        if self.on_change is not None:
            self.on_change(self)
        self.publish(state, **data)

    # -- waiting (on the event loop) --------------------------------------------------------------
    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def next_events(self, seen: int, timeout: float) -> list[tuple[str, dict]]:
        """Events after the first `seen`, waiting up to `timeout` seconds for one."""
        changed = self._changed  # taken before looking: a wake after the look still reaches us
        if len(self.events) <= seen:
            try:
                await asyncio.wait_for(changed.wait(), timeout)
            except TimeoutError:
                pass
        return self.events[seen:]

    async def wait(self, timeout: float, states=FINISHED) -> bool:
        """Wait until the job is in one of `states` (finished, by default) or `timeout` seconds passed;
        whether it is."""
        deadline = time.monotonic() + timeout
        seen = 0
        while self.state not in states and (left := deadline - time.monotonic()) > 0:
            seen += len(await self.next_events(seen, left))
        return self.state in states


class JobQueue:
    """Jobs waiting for one hosted model, at most `depth` of them."""

    def __init__(self, depth: int):
        self.depth = depth
        self._jobs: deque[Job] = deque()
        self._ready = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._jobs)

    def put(self, job: Job) -> None:
        with self._ready:
            if len(self._jobs) >= self.depth:
                error = ServiceError(f"the queue of model '{job.model}' is full ({self.depth} jobs waiting); "
                                     "try again shortly", status=429, code="queue_full")
                error.retry_after = 2
                raise error
            self._jobs.append(job)
            job.queued(len(self._jobs))
            self._ready.notify_all()  # a worker waiting for companions counts them too

    def take(self, jobs: int = 1, size: int = 0, wait: float = 0.0) -> list[Job] | None:
        """The next job and up to `jobs - 1` queued jobs of its group, all together at most `size` big
        (blocking; waiting up to `wait` seconds for companions); None once the queue is closed."""
        with self._ready:
            first = None
            while first is None or not self._jobs or self._jobs[0] is not first:  # it may be cancelled meanwhile
                while not self._jobs and not self._closed:
                    self._ready.wait()
                if self._closed:
                    return None
                first, deadline = self._jobs[0], time.monotonic() + wait
                while len(self._jobs) < jobs and self._jobs[0] is first and (left := deadline - time.monotonic()) > 0:
                    self._ready.wait(left)
                    if self._closed:
                        return None
                    if not self._jobs:
                        break
            batch, total = [first], None  # (no group or size is asked of a job that goes alone)
            for job in itertools.islice(self._jobs, 1, None):
                if len(batch) == jobs:
                    break
                total = first.size if total is None else total
                if first.group is None or job.group != first.group or total + job.size > size:
                    continue  # it waits for a batch of its own kind; order within a group is kept
                batch.append(job)
                total += job.size
            for job in batch:
                self._jobs.remove(job)
            self._moved()
            return batch

    def remove(self, job: Job) -> bool:
        """Take a queued job out (cancelled); whether it was still waiting."""
        with self._ready:
            try:
                self._jobs.remove(job)
            except ValueError:
                return False
            self._moved()
            self._ready.notify_all()
            return True

    def _moved(self) -> None:
        for position, job in enumerate(self._jobs, 1):
            job.queued(position)

    def close(self) -> list[Job]:
        """Stop the worker; returns the jobs still waiting."""
        with self._ready:
            self._closed = True
            waiting, self._jobs = list(self._jobs), deque()
            self._ready.notify_all()
            return waiting


def model_groups(jobs: list[Job]) -> list:
    """Each job's group as `Model.batching` gave it (a job's `group` is that and the limits, or None); a
    batch of one needs none."""
    if len(jobs) == 1:
        return [None]
    return [job.group and job.group[0] for job in jobs]


class Worker(threading.Thread):
    """Runs batches of jobs from one queue: `execute(jobs, started, finish)` answers each with (result bytes,
    logs, missing) or the exception that failed it, and calls `started()` once the batch is in the model's
    hands (the jobs show as running from then; one that never calls it, just before their answers). A job
    answered before the batch ends (a generation that ended before the others) is finished then, by
    `finish(its number, its answer)`; its place in the answers is then ignored (None will do). Several
    workers may share a queue (one per replica).

    A runner that hands the batch to another process says so after sending it: the event loop, woken by
    the news (a streamed submission waits for it to answer), would otherwise hold the interpreter while
    this thread pickles and sends the batch, and delay the job's first step by as much."""

    def __init__(self, queue: JobQueue, execute, *, name: str, status_of, on_done=None, batch: tuple = (1, 0, 0.0)):
        super().__init__(name=f"interlace-worker-{name}", daemon=True)
        self.queue, self.execute, self.status_of, self.on_done = queue, execute, status_of, on_done
        self.batch = batch  # (jobs, size, wait) of JobQueue.take
        self.current: list[Job] = []

    def run(self) -> None:
        while (jobs := self.queue.take(*self.batch)) is not None:
            for job in [job for job in jobs if job.cancel.is_set()]:  # cancelled while it waited
                job.fail(CancelledError("the job was cancelled while queued"), 410)
                jobs.remove(job)
            if not jobs:
                continue
            self.current = jobs

            finished = set()  # jobs answered before the batch's end

            def started(jobs=jobs) -> None:
                for job in jobs:
                    job.running()

            def finish(number: int, answer, jobs=jobs, finished=finished) -> None:
                finished.add(number)
                self._finish(jobs[number], answer)

            try:
                answers = self.execute(jobs, started, finish)
            except Exception as error:  # noqa: BLE001 - a failed batch must never stop the worker
                answers = [error] * len(jobs)
            started()
            for number, (job, answer) in enumerate(zip(jobs, answers)):
                if number not in finished:
                    self._finish(job, answer)
            self.current = []

    def _finish(self, job: Job, answer) -> None:
        try:
            if isinstance(answer, Exception):
                if self.status_of(answer) == 500:
                    log.error("job %s failed unexpectedly", job.id, exc_info=answer)
                job.fail(answer, self.status_of(answer))
            else:
                job.complete(*answer)
        finally:
            if self.on_done is not None:
                self.on_done(job)
