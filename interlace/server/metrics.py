"""Prometheus metrics of one server: jobs by outcome, queue depth, time waiting and running, refusals,
jobs per batch, restarts of the models' worker processes.

Each app has its own registry, so several apps in one process (tests) keep separate counts.
`GET /metrics` serves them in Prometheus' text format.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily

_SECONDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, models: dict | None = None):
        """models: the hosted models by name, whose worker restarts are read when the metrics are."""
        self.registry = registry = CollectorRegistry()
        registry.register(_WorkerRestarts(models or {}))
        self.submitted = Counter("interlace_jobs_submitted", "Jobs accepted into a queue", ["model"], registry=registry)
        self.finished = Counter("interlace_jobs_finished", "Jobs finished, by final state", ["model", "state"],
                                registry=registry)
        self.refused = Counter("interlace_requests_refused", "Requests answered with an error, by status",
                               ["status"], registry=registry)
        self.queued = Gauge("interlace_queue_depth", "Jobs waiting in the queue", ["model"], registry=registry)
        self.waited = Histogram("interlace_job_wait_seconds", "Time from submission to start", ["model"],
                                buckets=_SECONDS, registry=registry)
        self.ran = Histogram("interlace_job_run_seconds", "Time a job ran on the model", ["model"],
                             buckets=_SECONDS, registry=registry)

        self.batch_jobs = Histogram("interlace_batch_jobs", "Jobs run together in one forward", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry)

    def job_done(self, job) -> None:
        self.finished.labels(job.model, job.state).inc()
        if job.started is not None:
            self.waited.labels(job.model).observe(job.started - job.created)
            self.ran.labels(job.model).observe(job.finished - job.started)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _WorkerRestarts:
    """`interlace_worker_restarts_total`: the hosted models' counts of worker processes started again, by why
    (kept by the runners: `HostedModel.worker_restarts`)."""

    def __init__(self, models: dict):
        self.models = models

    def collect(self):
        family = CounterMetricFamily("interlace_worker_restarts", "Model worker processes started again, by reason",
                                     labels=["model", "reason"])
        for name, hosted in self.models.items():
            for reason, times in hosted.worker_restarts.items():
                family.add_metric([name, reason], times)
        yield family
