"""Jobs: one submitted request each, a queue and a worker per hosted model, and what keys may submit.

A hosted model runs one job at a time: hooks sit on the shared module, so two graphs on it at once
would see each other's activations. `Worker` owns that model's queue and its thread; the HTTP side
only enqueues and reads job state, so it never waits on the model. `Admission` bounds each key's
rate and jobs in flight; `JobStore` finds a job by id for the key that made it, and only that key.
"""

from __future__ import annotations

import collections
import secrets
import threading
import time

from ..errors import CancelledError
from .errors import HTTPProblem, problem
from .settings import ServerSettings

_DONE = frozenset({"completed", "failed", "cancelled"})


class Job:
    """A request on its way through the server: its state, its events, its result or error."""

    def __init__(self, key_id: str, model_id: str, request, size: int):
        self.id = secrets.token_urlsafe(16)
        self.key_id, self.model_id, self.request, self.size = key_id, model_id, request, size
        self.state = "queued"
        self.submitted, self.started, self.finished = time.time(), None, None
        self.result: bytes | None = None
        self.error: HTTPProblem | None = None
        self.cancel = threading.Event()  # the executor checks it between operations
        self.events: list[dict] = []
        self._changed = threading.Condition()

    @property
    def done(self) -> bool:
        return self.state in _DONE

    def publish(self, event: str, state: str | None = None, **data) -> None:
        """Add an event (and change the state with it, in one step for the readers of both)."""
        with self._changed:
            if state is not None:
                self.state = state
            self.events.append({"event": event, **data})
            self._changed.notify_all()

    def finish(self, result: bytes | None = None, error: Exception | None = None) -> None:
        self.finished = time.time()
        if error is None:
            self.result = result
            self.publish("completed", "completed", seconds=round(self.finished - (self.started or self.submitted), 6))
        else:
            self.error = problem(error)
            state = "cancelled" if isinstance(error, CancelledError) else "failed"
            self.publish("error", state, **self.error.body(), status=self.error.status)

    def wait(self, timeout: float) -> bool:
        """Wait until the job is done (at most `timeout` seconds); whether it is."""
        with self._changed:
            return self._changed.wait_for(lambda: self.done, timeout)

    def events_after(self, seen: int, timeout: float) -> list[dict]:
        """The events after the first `seen`, waiting up to `timeout` for one."""
        with self._changed:
            self._changed.wait_for(lambda: len(self.events) > seen or self.done, timeout)
            return self.events[seen:]

    def status(self, position: int | None) -> dict:
        status = {"id": self.id, "model": self.model_id, "state": self.state, "submitted": self.submitted,
                  "started": self.started, "finished": self.finished}
        if position is not None:
            status["position"] = position
        if self.error is not None:
            status["error"] = self.error.body()
        return status


class Worker:
    """The queue of one hosted model and the thread that runs its jobs, one at a time."""

    def __init__(self, hosted, settings: ServerSettings, metrics):
        self.hosted, self.settings, self.metrics = hosted, settings, metrics
        self.queue: collections.deque[Job] = collections.deque()
        self.running: Job | None = None
        self._lock = threading.Condition()
        self._stopped = False
        self.thread = threading.Thread(target=self._loop, name=f"interlace-{hosted.id}", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if len(self.queue) >= self.settings.queue_depth:
                raise HTTPProblem(429, "QueueFull", f"the queue of {self.hosted.id} is full "
                                  f"({self.settings.queue_depth} jobs waiting)", "try again in a moment")
            self.queue.append(job)
            job.publish("queued", position=len(self.queue) - 1 + (self.running is not None))
            self.metrics.queue_depth.labels(self.hosted.id).set(len(self.queue))
            self._lock.notify()

    def position(self, job: Job) -> int | None:
        """How many jobs run before this one (None when it is not waiting)."""
        with self._lock:
            if job not in self.queue:
                return None
            return self.queue.index(job) + (self.running is not None)

    def cancel(self, job: Job) -> None:
        job.cancel.set()
        with self._lock:
            queued = job in self.queue
            if queued:
                self.queue.remove(job)
                self._announce_positions()
        if queued:
            job.finish(error=CancelledError("the job was cancelled while it waited in the queue"))

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify()
        self.thread.join(timeout=10)

    def _announce_positions(self) -> None:
        for number, waiting in enumerate(self.queue):
            waiting.publish("queued", position=number + (self.running is not None))
        self.metrics.queue_depth.labels(self.hosted.id).set(len(self.queue))

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self.queue or self._stopped)
                if self._stopped:
                    return
                job = self.running = self.queue.popleft()
                self._announce_positions()
            try:
                self._run(job)
            finally:
                with self._lock:
                    self.running = None

    def _run(self, job: Job) -> None:
        job.started = time.time()
        job.publish("running", "running")
        self.metrics.waited.labels(job.model_id).observe(job.started - job.submitted)
        try:
            result = self.hosted.run(job.request, cancel=job.cancel)
        except Exception as error:  # noqa: BLE001 - every failure is the job's, never the server's
            job.finish(error=error)
        else:
            job.finish(result=result)
        self.metrics.finished.labels(job.model_id, job.state).inc()
        self.metrics.ran.labels(job.model_id).observe(job.finished - job.started)


class Admission:
    """Per key: at most `rate_per_minute` submissions a minute and `concurrent_per_key` jobs in flight."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self._recent: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._jobs: dict[str, set] = collections.defaultdict(set)
        self._lock = threading.Lock()

    def admit(self, key_id: str, job: Job) -> None:
        now = time.monotonic()
        with self._lock:
            recent = self._recent[key_id]
            while recent and now - recent[0] > 60:
                recent.popleft()
            if len(recent) >= self.settings.rate_per_minute:
                raise HTTPProblem(429, "RateLimited", f"this key submitted {len(recent)} jobs in the last minute, "
                                  f"the limit is {self.settings.rate_per_minute}", "wait a little, then submit again")
            active = {j for j in self._jobs[key_id] if not j.done}
            if len(active) >= self.settings.concurrent_per_key:
                raise HTTPProblem(429, "TooManyJobs", f"this key has {len(active)} jobs queued or running, the "
                                  f"limit is {self.settings.concurrent_per_key}", "wait for one to finish")
            recent.append(now)
            active.add(job)
            self._jobs[key_id] = active


class JobStore:
    """Jobs by id; a job is found only with the key that submitted it, and kept `result_seconds`."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def add(self, job: Job) -> None:
        with self._lock:
            self._forget_old()
            self._jobs[job.id] = job

    def get(self, job_id: str, key_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or job.key_id != key_id:  # another key's job is as unknown as no job
            raise HTTPProblem(404, "UnknownJob", f"no job {job_id!r} for this key", "check the job id")
        return job

    def _forget_old(self) -> None:
        cutoff = time.time() - self.settings.result_seconds
        for job_id in [i for i, job in self._jobs.items() if job.done and job.finished < cutoff]:
            del self._jobs[job_id]
