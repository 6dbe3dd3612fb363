"""Prometheus metrics of one server, in a registry of its own (`GET /metrics`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.submitted = Counter("interlace_jobs_submitted", "Jobs accepted into a queue", ["model"],
                                 registry=self.registry)
        self.rejected = Counter("interlace_requests_rejected", "Requests answered with an error before queueing",
                                ["code"], registry=self.registry)
        self.finished = Counter("interlace_jobs_finished", "Jobs finished, by state", ["model", "state"],
                                registry=self.registry)
        self.waited = Histogram("interlace_job_queue_seconds", "Time from submission to start", ["model"],
                                buckets=_SECONDS, registry=self.registry)
        self.ran = Histogram("interlace_job_run_seconds", "Time a job ran on the model", ["model"],
                             buckets=_SECONDS, registry=self.registry)
        self.queue_depth = Gauge("interlace_queue_depth", "Jobs waiting", ["model"], registry=self.registry)
