"""FastAPI dependencies for who is calling and how much they may ask: the API key, rate, concurrency.

`caller` reads `Authorization: Bearer <key>` and answers 401 unless the key store knows the key.
`Quota` holds each key to `rate` submissions a minute (a sliding window) and `jobs_per_key`
unfinished jobs at once; both answer 429 with a Retry-After.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque

from fastapi import Request

from ..errors import ServiceError
from .keys import Key

_WINDOW = 60.0


async def service(request: Request):
    """The app's `Service` (see app.py). Dependencies are async so they run on the event loop: a sync
    one costs a hop to the thread pool on every request."""
    return request.app.state.service


async def caller(request: Request) -> Key:
    """The key of the request, verified (one indexed SQLite read); 401 without one or with a bad or revoked one."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ServiceError("no API key: send the header `Authorization: Bearer <key>`",
                           status=401, code="unauthorized")
    key = request.app.state.service.keys.verify(token.strip())
    if key is None:
        raise ServiceError("the API key is not valid (unknown or revoked)", status=401, code="unauthorized")
    return key


class Quota:
    """Per-key budgets: submissions per minute and unfinished jobs."""

    def __init__(self, rate: int, jobs_per_key: int):
        self.rate, self.jobs_per_key = rate, jobs_per_key
        self._times: dict[str, deque] = defaultdict(deque)
        self._lock = threading.Lock()

    def count_submission(self, key: str) -> None:
        now = time.monotonic()
        with self._lock:
            times = self._times[key]
            while times and times[0] <= now - _WINDOW:
                times.popleft()
            if len(times) >= self.rate:
                error = ServiceError(f"this key sent {len(times)} jobs in the last minute, the limit is "
                                     f"{self.rate} (--rate)", status=429, code="rate_limited")
                error.retry_after = max(1, int(times[0] + _WINDOW - now) + 1)
                raise error
            times.append(now)

    def check_active(self, key: str, active: int) -> None:
        if active >= self.jobs_per_key:
            error = ServiceError(f"this key has {active} unfinished jobs, the limit is {self.jobs_per_key} "
                                 "(--jobs-per-key); wait for one to finish", status=429, code="too_many_jobs")
            error.retry_after = 1
            raise error
