"""The service: its settings, the state it holds (models, queues, workers, jobs, keys), the app factory.

`create_app(models, keys, config)` builds the FastAPI app: one router per resource (`routers/`),
auth and quotas as dependencies (`auth.py`), one error mapping (`errors.py`). Each hosted model
instance has a bounded `JobQueue` and one `Worker` thread, which runs queued jobs that can share a
forward as one batch; the HTTP side only reads requests, checks
them (in a thread pool) and waits on events, so it never blocks on the model. Jobs are kept in the key
database (`store.py`) and taken back at start; a watcher thread cancels the jobs of revoked keys;
`serve` runs the app on uvicorn and drains on SIGTERM.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import threading
import time
from contextlib import asynccontextmanager, contextmanager

import uvicorn
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from .. import collector
from ..backends.serialize import declared_nodes
from ..errors import CancelledError, ServiceError
from . import errors
from .auth import Quota
from .config import STREAM_CHECK, ServerConfig
from .hosting import HostedModel
from .jobs import FINISHED, Job, JobQueue, Worker, model_groups
from .keys import KeyStore
from .metrics import Metrics
from .store import JobStore
from .routers import health, jobs, models as model_routes

log = logging.getLogger("interlace.server")
REVOCATION_CHECK = 0.25  # seconds between looks for revoked keys (revoked by `interlace keys`, another process)
INLINE_ADMISSION = (64 * 1024, 2048)  # bytes and nodes (copies included) of a request checked on the event loop
DRAIN_RETRY = 30  # seconds a submission refused while the server drains is told to wait (Retry-After)


class Service:
    """Everything one server holds, shared by its routes and its workers."""

    def __init__(self, models: list[HostedModel], keys: KeyStore, config: ServerConfig, runners: dict | None = None):
        self.models = {hosted.name: hosted for hosted in models}
        self.keys, self.config = keys, config
        self.queues = {name: JobQueue(config.queue_depth) for name in self.models}
        self.store = JobStore(keys.path, config.result_ttl)  # beside the keys: jobs outlive the process
        self.quota = Quota(config.rate, config.jobs_per_key)
        self.metrics = Metrics(self.models)
        runners = runners or {name: [self._runner(hosted)] for name, hosted in self.models.items()}
        batch = (config.batch_jobs, config.batch_tokens, config.batch_wait)
        self.workers = [Worker(self.queues[name], self._counted(name, run), name=name, status_of=errors.status_of,
                               on_done=self._done, batch=batch)
                        for name in self.models for run in runners[name]]
        self._stopping = threading.Event()
        self.draining = False  # SIGTERM: no new submissions; what runs finishes, what waits stays for a restart
        self.closing = False  # the last moment: waits and event streams end now
        self.listeners = 0  # waits and event streams open (changed on the event loop only; see listening)
        self._watcher = threading.Thread(target=self._watch_keys, name="interlace-revocations", daemon=True)

    @staticmethod
    def _runner(hosted: HostedModel):
        """Run a batch of jobs on the model in this process."""
        def execute(jobs: list[Job], started, finish) -> list:
            started()
            return hosted.execute_many([job.request for job in jobs], limits=jobs[0].limits,
                                       cancels=[job.cancel for job in jobs],
                                       groups=model_groups(jobs),
                                       on_steps=[job.publish_step if job.stream else None for job in jobs],
                                       on_answers=[functools.partial(finish, number) for number in range(len(jobs))])

        return execute

    def _counted(self, name: str, run):
        def execute(jobs: list[Job], started, finish) -> list:
            self.metrics.queued.labels(name).set(len(self.queues[name]))
            self.metrics.batch_jobs.labels(name).observe(len(jobs))
            return run(jobs, started, finish)

        return execute

    def _done(self, job: Job) -> None:
        job.request, job.data = None, b""  # the inputs are no longer needed; the result stays until it expires
        self.metrics.job_done(job)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._restore(loop)
        for worker in self.workers:
            worker.start()
        self._watcher.start()

    def _restore(self, loop) -> None:
        """Take back the jobs an earlier run of this server left: queued ones queue again (in their order),
        unless this server hosts another model under their model's name; a running one is lost."""
        for job, fingerprint, timeout, data in self.store.load(loop):
            hosted = self.models.get(job.model)
            if job.state == "running":
                job.fail(_restarted("the server stopped while the job ran"), 503)
            elif hosted is None or hosted.fingerprint() != fingerprint:
                job.fail(_restarted(f"the server restarted without the model '{job.model}' it was submitted to"), 503)
            else:
                try:
                    job.limits = hosted.limits_for(timeout)
                    job.request = hosted.admit(data)
                    job.batching = functools.partial(hosted.batching, job.request, job.limits)
                    job.data = data
                    self.queues[hosted.name].put(job)
                except Exception as error:  # noqa: BLE001 - the server's limits changed, the queue is full...
                    job.fail(_restarted(f"the server restarted and could not queue the job again: {error}"), 503)

    def _watch_keys(self) -> None:
        """Cancel the jobs of keys revoked since they were submitted: queued ones never run, running ones
        stop at their next operation, and their event streams end with the reason."""
        while not self._stopping.wait(REVOCATION_CHECK):
            active = {job.key for job in self.store.unfinished()}
            revoked = active & self.keys.revoked() if active else set()
            for job in self.store.unfinished(revoked):
                self.cancel(job, "the API key that submitted this job was revoked")

    def drain(self) -> None:
        """Stop taking work (SIGTERM): new submissions get 503, queued jobs stay queued in the database for
        the next start, and this returns once the running batches have finished."""
        self.draining = True
        for queue in self.queues.values():
            queue.close()
        for worker in self.workers:
            worker.join()

    def stop(self, timeout: float = 10.0) -> None:
        """End the service: queued jobs stay queued (in the database, for the next start), running ones are
        cancelled (a drain has let them finish already), waits and event streams end."""
        self.closing = True
        self._stopping.set()
        for queue in self.queues.values():
            queue.close()
        for worker in self.workers:
            for job in worker.current:
                self.cancel(job, "the server stopped")
        for worker in self.workers:
            worker.join(timeout)
        if not any(worker.is_alive() for worker in self.workers):  # one still running would write its job's end
            self.store.close()

    async def wait(self, job: Job, seconds: float) -> None:
        """Wait up to `seconds` (at most --max-wait) for the job to finish, or for the server to stop."""
        deadline = asyncio.get_running_loop().time() + min(seconds, self.config.max_wait)
        with self.listening():
            while job.state not in FINISHED and not self.closing and (left := deadline - asyncio.get_running_loop().time()) > 0:
                await job.wait(min(left, STREAM_CHECK))

    @contextmanager
    def listening(self):
        """Around a wait or an event stream: each looks at `closing` every STREAM_CHECK seconds, and a
        stopping server waits for those open to end (`wait_for_listeners`)."""
        self.listeners += 1
        try:
            yield
        finally:
            self.listeners -= 1

    def wait_for_listeners(self) -> None:
        """Once `closing` is set: until every wait and event stream open has seen it and ended with its final
        answer (at most STREAM_CHECK + 0.5 s); at once when none is open."""
        deadline = time.monotonic() + STREAM_CHECK + 0.5
        while self.listeners and time.monotonic() < deadline:
            time.sleep(0.02)

    def model(self, name: str | None) -> HostedModel:
        if name is None and len(self.models) == 1:
            return next(iter(self.models.values()))
        if name not in self.models:
            error = ServiceError(f"this server hosts no model '{name}'; it hosts {', '.join(map(repr, self.models))}",
                                 status=404, code="not_found")
            error.hint = "use one of the hosted model ids (GET /v1/models lists them)"
            raise error
        return self.models[name]

    def refuse_if_draining(self) -> None:
        if self.draining or self.closing:
            error = ServiceError("the server is shutting down and takes no new jobs; submit again once it is back",
                                 status=503, code="shutting_down")
            error.retry_after = DRAIN_RETRY
            raise error

    async def submit(self, data: bytes, key: str, model: str | None, timeout: float | None,
                     idempotency: str | None = None, stream: bool = False) -> Job:
        """Check a request and queue it as a job; every refusal happens here, before the queue.
        idempotency: the client's Idempotency-Key: the same key and value give back the job made first.
        stream: publish a `step` event per generation step."""
        self.refuse_if_draining()
        if idempotency and (job := self.store.idempotent(key, idempotency)) is not None:
            return job
        hosted = self.model(model)
        self.quota.count_submission(key)
        self.quota.check_active(key, self.store.active(key))
        limits = hosted.limits_for(timeout)

        # a small request is checked right here: handing it to a thread and back would cost a streamed job's
        # first token more (two wake-ups) than the check (well under a millisecond); a large one would hold
        # up every other request meanwhile
        small = len(data) <= INLINE_ADMISSION[0] and (declared_nodes(data) or 0) <= INLINE_ADMISSION[1]
        request = hosted.admit(data) if small else await run_in_threadpool(hosted.admit, data)
        # nothing awaits from here on: the checks and the queueing happen as one step
        self.quota.check_active(key, self.store.active(key))
        self.refuse_if_draining()
        if idempotency and (job := self.store.idempotent(key, idempotency)) is not None:  # sent twice at once
            return job
        job = Job(request, key=key, model=hosted.name, limits=limits, loop=asyncio.get_running_loop(), data=data,
                  batching=functools.partial(hosted.batching, request, limits), stream=stream)
        self.store.add(job, fingerprint=hosted.fingerprint(), timeout=timeout, idempotency=idempotency)
        try:
            self.queues[hosted.name].put(job)
        except ServiceError:
            self.store.discard(job)
            raise
        self.metrics.submitted.labels(hosted.name).inc()
        self.metrics.queued.labels(hosted.name).set(len(self.queues[hosted.name]))
        return job

    def cancel(self, job: Job, why: str = "the job was cancelled") -> None:
        """Cancel a job now: a queued one leaves the queue, a running one stops at its next operation or
        generation step (its answer, if one still comes, is dropped)."""
        queued = job.state == "queued"  # (not what the queue's remove says: a stopping server's queue is closed)
        job.cancel.set()
        self.queues[job.model].remove(job)
        job.fail(CancelledError(f"{why} while {'queued' if queued else 'running'}"), 410)


def create_app(models: list[HostedModel], keys: KeyStore, config: ServerConfig | None = None,
               runners: dict | None = None) -> FastAPI:
    """The app serving `models`. `runners` (default: each model in this process) maps a model's name to
    functions that each run a batch of its jobs somewhere (one worker thread each, e.g. one per replica)."""
    service = Service(models, keys, config or ServerConfig(), runners)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(service.start, asyncio.get_running_loop())
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    app = FastAPI(title="interlace", lifespan=lifespan)
    app.state.service = service
    errors.install(app)
    for router in (health.router, model_routes.router, jobs.router):
        app.include_router(router)

    app.add_middleware(_CountRefusals, metrics=service.metrics)
    return app


def serve(app: FastAPI, *, host: str, port: int, log_level: str, ssl_certfile: str | None = None,
          ssl_keyfile: str | None = None) -> None:
    """Run the app on uvicorn until Ctrl-C (running jobs are cancelled) or SIGTERM, which drains: new
    submissions get 503, status, results and event streams keep answering, the running batches finish,
    queued jobs stay in the database for the next start, then the process exits with 0. With a certificate
    and its key, it serves HTTPS."""
    service: Service = app.state.service

    class Draining(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if sig != signal.SIGTERM:
                return super().handle_exit(sig, frame)
            if not service.draining:
                threading.Thread(target=self._drain, name="interlace-drain", daemon=True).start()
            return None  # not re-raised once uvicorn is done: a drained server exits 0

        def _drain(self) -> None:
            log.info("SIGTERM: draining (no new jobs; the running ones finish; queued ones wait for a restart)")
            service.drain()
            service.closing = True
            service.wait_for_listeners()
            self.should_exit = True

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                            ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    collector.settle()  # what is loaded by now stays: the collector's full passes need not walk it
    Draining(config).run()


def _restarted(message: str) -> ServiceError:
    return ServiceError(f"{message}; submit it again", status=503, code="server_restarted")


class _CountRefusals:
    """Counts answers of status 400 and above by status (plain ASGI: a BaseHTTPMiddleware costs a task
    and a stream per request)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.metrics.refused.labels(str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)
