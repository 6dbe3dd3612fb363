"""The client of `interlace serve`: send a request, follow its job, bring back its outcome.

`RemoteBackend(host, api_key, model)` talks to one model of one server (`INTERLACE_HOST` and
`INTERLACE_API_KEY` are the defaults). `run(request)` submits the request's bytes and, when
blocking, waits for the result, showing the job's queue position and state as the server reports
them; otherwise it returns a `RemoteJob` (`status()`, `result()`, `cancel()`). Errors come back as
the same interlace error classes, naming the user's own file and line (read here, on the client).
"""

from __future__ import annotations

import json
import os
import sys
import time

import httpx

from .. import errors
from ..errors import InterlaceError, describe_location
from ..graph import Outcome, Request
from .limits import Limits
from .serialize import VERSION, deserialize_results, serialize_request

_WAIT = 30.0  # seconds the server may hold a submission for its result
# results from our own server are trusted to be well-formed, but not to be small
_RESULT_LIMITS = Limits(max_frame_bytes=1 << 40, max_header_bytes=1 << 34, max_tensor_bytes=1 << 40,
                        max_nodes=10**9, max_string_length=1 << 30, max_list_length=1 << 32, max_int_bits=1 << 16)


class RemoteError(InterlaceError):
    """The server refused a request for a reason of its own (key, rate, queue, unknown job)."""

    def __init__(self, message: str, status: int, code: str):
        super().__init__(message)
        self.status, self.code = status, code


class RemoteBackend:
    """One model on one server.

    >>> backend = RemoteBackend("http://127.0.0.1:8000", "il_0000_secret", "smollm2")
    >>> backend.host, backend.model
    ('http://127.0.0.1:8000', 'smollm2')
    """

    def __init__(self, host: str | None = None, api_key: str | None = None, model: str | None = None):
        self.host = (host or os.environ.get("INTERLACE_HOST") or "").rstrip("/")
        if not self.host:
            raise InterlaceError("no server to run on: pass host='http://...' or set INTERLACE_HOST")
        self.api_key = api_key or os.environ.get("INTERLACE_API_KEY")
        self.model = model
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.client = httpx.Client(base_url=self.host, headers=headers, timeout=httpx.Timeout(_WAIT + 30, connect=10))

    def manifest(self) -> dict:
        """The model's config, module tree and tokenizer, as the server describes them."""
        manifest = self._json("GET", f"/v1/models/{self.model}/manifest")
        if manifest.get("wire_version") != VERSION:
            raise errors.VersionError(f"the server speaks wire format version {manifest.get('wire_version')}, this "
                                      f"interlace version {VERSION}: use the same interlace version on both sides")
        return manifest

    def run(self, request: Request, *, blocking: bool = True, timeout: float | None = None, progress: bool = True):
        """Submit `request`; its `Outcome` when blocking (waiting at most `timeout` s), else a `RemoteJob`."""
        params = {"wait": min(_WAIT, timeout) if timeout else _WAIT} if blocking else {}
        if self.model is not None:
            params["model"] = self.model
        response = self._send("POST", "/v1/jobs", params=params, content=serialize_request(request),
                              headers={"Content-Type": "application/octet-stream"})
        if response.status_code == 200:
            return self._outcome(response)
        job = RemoteJob(self, response.json()["id"])
        return job.result(timeout, progress) if blocking else job

    # -- plumbing ----------------------------------------------------------------------------------
    def _send(self, method: str, path: str, **options) -> httpx.Response:
        try:
            response = self.client.request(method, path, **options)
        except httpx.HTTPError as error:
            raise RemoteError(f"cannot reach the server at {self.host}: {error}", 0, "Unreachable") from None
        if response.status_code >= 400:
            raise remote_error(response)
        return response

    def _json(self, method: str, path: str, **options) -> dict:
        return self._send(method, path, **options).json()

    def _outcome(self, response: httpx.Response) -> Outcome:
        return deserialize_results(response.content, limits=_RESULT_LIMITS)


class RemoteJob:
    """A job running on the server: `status()`, `result()` (waits), `cancel()`."""

    def __init__(self, backend: RemoteBackend, job_id: str):
        self.backend, self.id = backend, job_id
        self.on_result = None  # called with the Outcome when it arrives (a tracer binds its values)

    def status(self) -> dict:
        return self.backend._json("GET", f"/v1/jobs/{self.id}")

    def cancel(self) -> dict:
        return self.backend._json("DELETE", f"/v1/jobs/{self.id}")

    def result(self, timeout: float | None = None, progress: bool = True) -> Outcome:
        """Wait for the job (following its events), then its outcome; an error raises as on a local run."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._follow(deadline, progress)
        response = self.backend._send("GET", f"/v1/jobs/{self.id}/result")
        if response.status_code == 202:  # still not done: the time ran out
            self.cancel()
            raise errors.DeadlineError(f"the remote job did not finish within timeout={timeout} s; it was cancelled")
        outcome = self.backend._outcome(response)
        if self.on_result is not None:
            self.on_result(outcome)
        return outcome

    def _follow(self, deadline: float | None, progress: bool) -> None:
        """Read the job's server-sent events until it is done (or the deadline), showing its state."""
        line = _StatusLine(enabled=progress)
        try:
            with self.backend.client.stream("GET", f"/v1/jobs/{self.id}/events", timeout=None) as events:
                if events.status_code >= 400:
                    events.read()
                    raise remote_error(events)
                for event in _server_sent(events.iter_lines()):
                    kind = event.get("event")
                    if kind == "queued":
                        line.show(f"job {self.id[:8]}: queued, {event['position']} ahead")
                    elif kind == "running":
                        line.show(f"job {self.id[:8]}: running")
                    elif kind in ("completed", "error"):
                        return
                    if deadline is not None and time.monotonic() > deadline:
                        return
        except httpx.HTTPError:
            return  # the result request below says what happened
        finally:
            line.close()


def remote_error(response: httpx.Response) -> InterlaceError:
    """The error a server answered with, as the same interlace class, at the user's own line."""
    try:
        body = response.json()
    except ValueError:
        body = {"code": "InternalError", "message": response.text[:500]}
    code, message, node = body.get("code", ""), body.get("message", ""), body.get("node")
    kind = getattr(errors, code, None)
    location = node.get("location") if isinstance(node, dict) else None
    if location:  # the server quotes the location as text; here we can show the line itself
        quoted = describe_location(tuple(location), read_source=False)
        message = message.replace(quoted, describe_location(tuple(location)), 1)
    if body.get("hint"):
        message = f"{message}\n  (server: {body['hint']})"
    if isinstance(kind, type) and issubclass(kind, InterlaceError):
        error = kind(message)
    else:
        error = RemoteError(f"{message} [HTTP {response.status_code} {code}]", response.status_code, code)
    error.node = node
    return error


def _server_sent(lines):
    """Events of a text/event-stream, as dicts (the server sends each event's data as JSON)."""
    data = []
    for line in lines:
        if line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            try:
                yield json.loads("\n".join(data))
            except ValueError:
                pass
            data = []


class _StatusLine:
    """One line on stderr that shows a job's state while a blocking call waits (only on a terminal)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.width = 0

    def show(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write("\r" + text.ljust(self.width))
            sys.stderr.flush()
            self.width = len(text)

    def close(self) -> None:
        if self.enabled and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()
