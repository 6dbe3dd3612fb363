"""The job store: every job by id, readable only with the key that made it, kept in SQLite beside the keys
so that jobs outlive the server's process.

One row per job: its key, model (and that model's fingerprint), state and times, the client's deadline and
`Idempotency-Key`, the request's bytes until the job runs, then the result's bytes (or its error) until
they expire. The jobs of a running server also live in memory as `Job`s (with their events and waiters);
the rows are what a restarted server reads back (`load`): finished jobs answer as before, queued ones are
queued again by the service. Writes come from the event loop (new jobs) and the workers (state changes),
one connection under a lock; WAL keeps readers (`interlace keys`) from waiting on them.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import Counter

from ..errors import ServiceError
from .jobs import FINISHED, Job

_SCHEMA = """CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, key TEXT NOT NULL, model TEXT NOT NULL, fingerprint TEXT NOT NULL, state TEXT NOT NULL,
    created REAL NOT NULL, started REAL, finished REAL, timeout REAL, idempotency TEXT,
    request BLOB, result BLOB, missing TEXT, error TEXT, status INTEGER NOT NULL DEFAULT 200,
    stream INTEGER NOT NULL DEFAULT 0)"""
_ADDED = {"stream": "INTEGER NOT NULL DEFAULT 0"}  # columns a database made by an earlier version lacks
SWEEP_INTERVAL = 1.0  # seconds between sweeps of expired jobs (a sweep walks every job: not one per submission)


class JobStore:
    """Jobs by id, each readable only with the key that made it; finished ones expire after `ttl` s.
    `path`: the SQLite file (the key database's; ":memory:" keeps nothing after the process)."""

    def __init__(self, path: str, ttl: float):
        self.ttl = ttl
        self._swept = float("-inf")  # when expired jobs were last removed
        self._jobs: dict[str, Job] = {}
        self._active: Counter = Counter()  # key -> unfinished jobs
        self._idempotent: dict[tuple[str, str], Job] = {}  # (key, Idempotency-Key) -> its job
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        with self._lock:
            if path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash loses at most the last commits, never the file
            self._db.execute(_SCHEMA)
            have = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
            for column, kind in _ADDED.items():
                if column not in have:
                    self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")

    def add(self, job: Job, *, fingerprint: str, timeout: float | None, idempotency: str | None = None) -> None:
        self.expire()
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, key, model, fingerprint, state, created, timeout, idempotency, request, stream) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.key, job.model, fingerprint, job.state, job.created, timeout, idempotency, job.data,
                 job.stream))
            self._remember(job, idempotency)

    def _remember(self, job: Job, idempotency: str | None) -> None:
        self._jobs[job.id] = job
        if job.state not in FINISHED:
            self._active[job.key] += 1
        if idempotency:
            self._idempotent[(job.key, idempotency)] = job
        job.on_change = self._changed

    def discard(self, job: Job) -> None:
        """Forget a job that never made it into the queue."""
        with self._lock:
            if self._jobs.pop(job.id, None) is not None:
                self._active[job.key] -= 1
                self._idempotent = {k: j for k, j in self._idempotent.items() if j is not job}
                self._db.execute("DELETE FROM jobs WHERE id = ?", (job.id,))

    def _changed(self, job: Job) -> None:
        """A job started or finished: its row follows (the request's bytes go once it runs)."""
        error = json.dumps(job.error) if job.error is not None else None
        missing = json.dumps({str(k): v for k, v in job.missing.items()})
        with self._lock:
            if job.state in FINISHED:
                self._active[job.key] -= 1
            self._db.execute(
                "UPDATE jobs SET state = ?, started = ?, finished = ?, request = NULL, result = ?, missing = ?, "
                "error = ?, status = ? WHERE id = ?",
                (job.state, job.started, job.finished, job.result, missing, error, job.status, job.id))

    def active(self, key: str) -> int:
        return self._active[key]

    def get(self, job_id: str, key: str) -> Job:
        self.expire()  # a server nobody submits to must not keep answering with results past their ttl
        job = self._jobs.get(job_id)
        if job is None or job.key != key:  # another key's job is as unknown as a made-up id
            raise ServiceError(f"no job '{job_id[:64]}' for this key (unknown, another key's, or expired)",
                               status=404, code="not_found")
        return job

    def idempotent(self, key: str, idempotency: str) -> Job | None:
        """The job this key already submitted with this Idempotency-Key, if it has not expired."""
        self.expire()
        return self._idempotent.get((key, idempotency))

    def of_key(self, key: str) -> list[Job]:
        """The key's jobs, newest first."""
        self.expire()
        with self._lock:
            return sorted((job for job in self._jobs.values() if job.key == key), key=lambda j: -j.created)

    def expire(self) -> None:
        """Forget the jobs finished more than `ttl` seconds ago; at most once per SWEEP_INTERVAL."""
        now = time.time()
        if now - self._swept < SWEEP_INTERVAL:
            return
        self._swept, cutoff = now, now - self.ttl
        with self._lock:
            old = [i for i, job in self._jobs.items() if job.finished is not None and job.finished < cutoff]
            for job_id in old:
                del self._jobs[job_id]
            if old:
                self._idempotent = {k: job for k, job in self._idempotent.items() if job.id in self._jobs}
            self._db.execute("DELETE FROM jobs WHERE finished IS NOT NULL AND finished < ?", (cutoff,))

    def unfinished(self, keys: set[str] | None = None) -> list[Job]:
        """Jobs not finished yet (of `keys` only, when given)."""
        with self._lock:
            return [job for job in self._jobs.values()
                    if job.state not in FINISHED and (keys is None or job.key in keys)]

    def load(self, loop) -> list[tuple[Job, str, float | None, bytes]]:
        """Read back the jobs of an earlier run of the server (once, at start). Finished ones are ready to
        answer; for each unfinished one: (job, its model's fingerprint, its deadline, its request bytes, none
        when it was running), for the service to queue again or to end."""
        self.expire()
        with self._lock:
            rows = self._db.execute(
                "SELECT id, key, model, fingerprint, state, created, started, finished, timeout, idempotency, "
                "request, result, missing, error, status, stream FROM jobs ORDER BY created").fetchall()
        pending = []
        for (job_id, key, model, fingerprint, state, created, started, finished, timeout, idempotency,
             request, result, missing, error, status, stream) in rows:
            if job_id in self._jobs:
                continue
            job = Job(None, key=key, model=model, limits=None, loop=loop, job_id=job_id, stream=bool(stream))
            job.created, job.started, job.finished = created, started, finished
            if state in FINISHED:
                job.state, job.result, job.status = state, result, status
                job.missing = {int(k): v for k, v in json.loads(missing or "{}").items()}
                job.error = json.loads(error) if error else None
                job.events.append((state, job.error or {}))  # what its event stream says now
            else:
                job.state = state  # queued, or running when the server stopped
                pending.append((job, fingerprint, timeout, request or b""))
            with self._lock:
                self._remember(job, idempotency)
        return pending

    def close(self) -> None:
        with self._lock:
            self._db.close()
