"""The service: its settings, the state it holds (models, queues, workers, jobs, keys), the app factory.

`create_app(models, keys, config)` builds the FastAPI app: one router per resource (`routers/`),
auth and quotas as dependencies (`auth.py`), one error mapping (`errors.py`). Each hosted model
instance has a bounded `JobQueue` and one `Worker` thread; the HTTP side only reads requests, checks
them (in a thread pool) and waits on events, so it never blocks on the model.
"""

from __future__ import annotations

import asyncio
import logging
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


class Service:
    """Everything one server holds, shared by its routes and its workers."""

    def __init__(self, models: list[HostedModel], keys: KeyStore, config: ServerConfig):
        self.models = {hosted.name: hosted for hosted in models}
        self.keys, self.config = keys, config
        self.queues = {name: JobQueue(config.queue_depth) for name in self.models}
        self.store = JobStore(config.result_ttl)
        self.quota = Quota(config.rate, config.jobs_per_key)
        self.metrics = Metrics()
        self.workers = [Worker(self.queues[name], self._runner(hosted), name=name, status_of=errors.status_of,
                               on_done=self._done) for name, hosted in self.models.items()]

    def _runner(self, hosted: HostedModel):
        def execute(job: Job):
            self.metrics.queued.labels(job.model).set(len(self.queues[job.model]))
            return hosted.execute(job.request, limits=job.limits, cancel=job.cancel)

        return execute

    def _done(self, job: Job) -> None:
        job.request = None  # the inputs are no longer needed; the result stays until it expires
        self.metrics.job_done(job)

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse what waits, cancel what runs, and let the workers end."""
        for queue in self.queues.values():
            for job in queue.close():
                job.fail(CancelledError("the server is shutting down"), 410)
        for worker in self.workers:
            if worker.current is not None:
                worker.current.cancel.set()
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
        request = await run_in_threadpool(hosted.admit, data)
        # nothing awaits from here on: the checks and the queueing happen as one step
        self.quota.check_active(key, self.store.active(key))
        job = Job(request, key=key, model=hosted.name, limits=hosted.limits_for(timeout),
                  loop=asyncio.get_running_loop())
        self.store.add(job)
        try:
            self.queues[hosted.name].put(job)
        except ServiceError:
            self.store.discard(job)
            raise
        self.metrics.submitted.labels(hosted.name).inc()
        self.metrics.queued.labels(hosted.name).set(len(self.queues[hosted.name]))
        return job

    def cancel(self, job: Job) -> None:
        job.cancel.set()  # a running job stops at its next operation
        if self.queues[job.model].remove(job):
            job.fail(CancelledError("the job was cancelled while queued"), 410)


def create_app(models: list[HostedModel], keys: KeyStore, config: ServerConfig | None = None) -> FastAPI:
    service = Service(models, keys, config or ServerConfig())

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

    @app.middleware("http")
    async def count_refusals(request, call_next):
        response = await call_next(request)
        if response.status_code >= 400:
            service.metrics.refused.labels(str(response.status_code)).inc()
        return response

    return app
