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
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from ..backends.serialize import serialize_step
from ..errors import CancelledError, LimitError, ServiceError
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

    @staticmethod
    def _runner(hosted: HostedModel):
        """Run a batch of jobs on the model in this process."""
        def execute(jobs: list[Job]) -> list:
            return hosted.execute_many([job.request for job in jobs], limits=jobs[0].limits,
                                       cancels=[job.cancel for job in jobs],
                                       groups=[job.group and job.group[0] for job in jobs],  # (model's, limits)
                                       on_steps=[step_publisher(job) for job in jobs])

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

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse what waits, cancel what runs, and let the workers end."""
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

    async def submit(self, data: bytes, key: str, model: str | None, timeout: float | None,
                     stream: bool = False) -> Job:
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
                  group=group, size=size, stream=stream)
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


def step_publisher(job: Job):
    """For a streamed job, what publishes each of its generation steps as a `step` event (its tokens,
    text, and values in the wire format); None for the others.

    The events stay with the job until it expires, so all its steps' values together are bounded by
    `max_result_bytes`, as its result is: past that the job fails (saying so) rather than the server's memory.
    """
    if not job.stream:
        return None
    graph, limits = job.request.graph, job.limits
    sent = 0

    def publish(step) -> None:
        nonlocal sent
        event = serialize_step(step, graph=graph, limits=limits)
        sent += len(event["values"] or "") * 3 // 4  # base64: four characters carry three bytes
        if sent > limits.max_result_bytes:
            raise LimitError(f"the values saved per step add up to more than the limit of {limits.max_result_bytes} "
                             f"bytes (max_result_bytes) by step {step.index}: save less per step, or stream fewer steps")
        job.publish("step", **event)

    return publish


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
