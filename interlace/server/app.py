"""The service: its settings, the state it holds (models, queues, workers, jobs, keys), the app factory.

`create_app(models, keys, config)` builds the FastAPI app: one router per resource (`routers/`),
auth and quotas as dependencies (`auth.py`), one error mapping (`errors.py`). Each hosted model
instance has a bounded `JobQueue` and one `Worker` thread, which runs queued jobs that can share a
forward as one batch; the HTTP side only reads requests, checks
them (in a thread pool) and waits on events, so it never blocks on the model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from ..errors import CancelledError, ServiceError
from . import errors
from .auth import Quota
from .config import ServerConfig
from .hosting import HostedModel
from .jobs import Job, JobQueue, JobStore, Worker
from .keys import KeyStore
from .metrics import Metrics
from .routers import health, jobs, models as model_routes

log = logging.getLogger("interlace.server")
REVOCATION_CHECK = 0.25  # seconds between looks for revoked keys (revoked by `interlace keys`, another process)


class Service:
    """Everything one server holds, shared by its routes and its workers."""

    def __init__(self, models: list[HostedModel], keys: KeyStore, config: ServerConfig, runners: dict | None = None):
        self.models = {hosted.name: hosted for hosted in models}
        self.keys, self.config = keys, config
        self.queues = {name: JobQueue(config.queue_depth) for name in self.models}
        self.store = JobStore(config.result_ttl)
        self.quota = Quota(config.rate, config.jobs_per_key)
        self.metrics = Metrics()
        runners = runners or {name: [self._runner(hosted)] for name, hosted in self.models.items()}
        batch = (config.batch_jobs, config.batch_tokens, config.batch_wait)
        self.workers = [Worker(self.queues[name], self._counted(name, run), name=name, status_of=errors.status_of,
                               on_done=self._done, batch=batch)
                        for name in self.models for run in runners[name]]
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch_keys, name="interlace-revocations", daemon=True)

    @staticmethod
    def _runner(hosted: HostedModel):
        """Run a batch of jobs on the model in this process."""
        def execute(jobs: list[Job]) -> list:
            return hosted.execute_many([job.request for job in jobs], limits=jobs[0].limits,
                                       cancels=[job.cancel for job in jobs],
                                       groups=[job.group and job.group[0] for job in jobs])  # (model's, limits)

        return execute

    def _counted(self, name: str, run):
        def execute(jobs: list[Job]) -> list:
            self.metrics.queued.labels(name).set(len(self.queues[name]))
            self.metrics.batch_jobs.labels(name).observe(len(jobs))
            return run(jobs)

        return execute

    def _done(self, job: Job) -> None:
        job.request, job.data = None, b""  # the inputs are no longer needed; the result stays until it expires
        self.metrics.job_done(job)

    def start(self) -> None:
        for worker in self.workers:
            worker.start()
        self._watcher.start()

    def _watch_keys(self) -> None:
        """Cancel the jobs of keys revoked since they were submitted: queued ones never run, running ones
        stop at their next operation, and their event streams end with the reason."""
        while not self._stopping.wait(REVOCATION_CHECK):
            active = {job.key for job in self.store.unfinished()}
            revoked = active & self.keys.revoked() if active else set()
            for job in self.store.unfinished(revoked):
                self.cancel(job, "the API key that submitted this job was revoked")

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse what waits, cancel what runs, and let the workers end."""
        self._stopping.set()
        for queue in self.queues.values():
            for job in queue.close():
                job.fail(CancelledError("the server is shutting down"), 410)
        for worker in self.workers:
            for job in worker.current:
                job.cancel.set()
        for worker in self.workers:
            worker.join(timeout)

    def model(self, name: str | None) -> HostedModel:
        if name is None and len(self.models) == 1:
            return next(iter(self.models.values()))
        if name not in self.models:
            raise ServiceError(f"this server hosts no model '{name}'; it hosts {', '.join(map(repr, self.models))}",
                               status=404, code="not_found")
        return self.models[name]

    async def submit(self, data: bytes, key: str, model: str | None, timeout: float | None) -> Job:
        """Check a request and queue it as a job; every refusal happens here, before the queue."""
        hosted = self.model(model)
        self.quota.count_submission(key)
        self.quota.check_active(key, self.store.active(key))
        limits = hosted.limits_for(timeout)

        def admit():
            request = hosted.admit(data)
            return (request, *hosted.batching(request, limits))

        request, group, size = await run_in_threadpool(admit)
        # nothing awaits from here on: the checks and the queueing happen as one step
        self.quota.check_active(key, self.store.active(key))
        job = Job(request, key=key, model=hosted.name, limits=limits, loop=asyncio.get_running_loop(), data=data,
                  group=group, size=size)
        self.store.add(job)
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
        job.cancel.set()
        queued = self.queues[job.model].remove(job)
        job.fail(CancelledError(f"{why} while {'queued' if queued else 'running'}"), 410)


def create_app(models: list[HostedModel], keys: KeyStore, config: ServerConfig | None = None,
               runners: dict | None = None) -> FastAPI:
    """The app serving `models`. `runners` (default: each model in this process) maps a model's name to
    functions that each run a batch of its jobs somewhere (one worker thread each, e.g. one per replica)."""
    service = Service(models, keys, config or ServerConfig(), runners)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
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
