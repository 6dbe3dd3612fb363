"""The service's settings: each is a flag of `interlace serve` (the budgets of one job are `Limits`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..backends.limits import Limits
from ..errors import InterlaceError

STREAM_CHECK = 1.0  # seconds between an event stream's (or a wait's) looks at whether the server is stopping
# seconds a streamed submission waits for its job to start before its events' answer is made: making it
# holds the interpreter (~1 ms) that the worker thread needs to hand the job to the model
STARTED_WAIT = 0.02


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one server; `limits` are the budgets of every job."""

    limits: Limits = field(default_factory=Limits)
    queue_depth: int = 64  # jobs waiting per model
    rate: int = 600  # submissions per key per minute
    jobs_per_key: int = 8  # unfinished jobs per key
    result_ttl: float = 600.0  # seconds a finished job's result stays readable
    max_wait: float = 60.0  # the longest ?wait= a request may hold
    # cross-user batching: queued jobs that can share a forward run as one batch
    batch_jobs: int = 16  # jobs in one batch (1: one job at a time)
    batch_tokens: int = 8192  # token positions (rows x padded length) of one batch
    batch_wait: float = 0.0  # seconds a job waits for companions; 0: run at once with what is queued

    def __post_init__(self):
        """Refuse settings under which no job would ever run or be read: a batch or queue of 0 jobs, say."""
        for name, least in _AT_LEAST.items():
            value = getattr(self, name)
            if not math.isfinite(value) or value < least:
                raise InterlaceError(f"{name} (--{name.replace('_', '-')}) must be at least {least}, not {value!r}")


# the least of each setting; a result stays readable a second at least (expired jobs are swept once a second)
_AT_LEAST = {"queue_depth": 1, "rate": 1, "jobs_per_key": 1, "result_ttl": 1, "max_wait": 0, "batch_jobs": 1,
             "batch_tokens": 1, "batch_wait": 0}
