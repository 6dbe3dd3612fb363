"""The remote backend: run a recorded request on an `interlace serve` server; only saved values come back.

`RemoteBackend(host, api_key, model=ID)` talks to one hosted model over HTTP. `build()` makes the
module tree on the meta device and the tokenizer from the server's manifest (no weights, no hub), so
envoy paths, `print(lm)` and scans work on a machine that has never seen the model. `run()` sends a
request (in the newest wire format version the server reads), waits for it, showing the queue
position and state from the job's events when it does not finish at once, prints its `log` lines,
and returns an `Outcome`; with `blocking=False` it returns a `Job` handle instead; `stream()` yields
each generation step as the job's events bring it. A server's error is raised here as the same class
a local run raises, with the user's own source line quoted (the server only knows file and line).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import secrets
import sys
import tempfile
import time
import weakref

import httpx
import torch

from .. import errors
from ..errors import InterlaceError, LimitError, ServiceError, VersionError, quote_sources
from ..graph import Outcome, Request
from .limits import Limits
from .serialize import SUPPORTED_VERSIONS, deserialize_results, deserialize_step, serialize_request

_FIRST_WAIT = 1.0  # seconds a blocking submission waits for its result before following events
_STREAM_TIMEOUT = httpx.Timeout(30.0, connect=10.0)  # of an event stream: the server pings every 15 s
_FINISHED = ("completed", "error", "cancelled")


def package_version() -> str:
    """This interlace's version, as installed."""
    try:
        return importlib.metadata.version("interlace")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class RemoteBackend:
    """One model of one server. `host` and `api_key` default to $INTERLACE_HOST and $INTERLACE_API_KEY."""

    def __init__(self, host: str | None = None, api_key: str | None = None, *, model: str, progress: bool = True):
        host = host or os.environ.get("INTERLACE_HOST")
        api_key = api_key or os.environ.get("INTERLACE_API_KEY")
        if not host:
            raise InterlaceError("no server: pass host='http://HOST:PORT' or set INTERLACE_HOST")
        if not host.startswith(("http://", "https://")):
            raise InterlaceError(f"the host {host!r} has no scheme: pass host='http://{host}' (or https://)")
        api_key = api_key and api_key.strip()  # pasted with a newline or a space
        if api_key and any(c.isspace() or not c.isprintable() for c in api_key):
            raise InterlaceError("the API key holds spaces or control characters: pass the key exactly as "
                                 "`interlace keys create` printed it (il_..., one word)")
        if not api_key:
            raise InterlaceError(f"no API key for the server at {host}: pass api_key=... or set INTERLACE_API_KEY "
                                 "(its operator creates one with `interlace keys create`)")
        self.host, self.model, self.progress = host.rstrip("/"), model, progress
        self._client = httpx.Client(base_url=self.host, headers={"Authorization": f"Bearer {api_key}"},
                                    timeout=httpx.Timeout(60.0, connect=10.0))
        self._manifest: dict | None = None

    # -- the model, without weights -------------------------------------------------------------------
    def manifest(self) -> dict:
        """The server's description of the model (fetched once). Requests are written in the newest wire
        version both sides know (`wire_versions`, which servers before version 2 did not list, is what the
        server reads); none in common is an error."""
        if self._manifest is None:
            manifest = self._call("GET", f"/v1/models/{self.model}/manifest").json()
            versions = manifest.get("wire_versions", [manifest["wire_version"]])
            common = set(versions) & set(SUPPORTED_VERSIONS)
            if not common:
                raise VersionError(
                    f"the server at {self.host} reads wire format version {', '.join(map(str, versions))} "
                    f"(interlace {manifest['interlace']}), this client writes {', '.join(map(str, SUPPORTED_VERSIONS))} "
                    f"(interlace {package_version()}): use the same interlace version on both sides")
            self._manifest, self._wire_version = manifest, max(common)
        return self._manifest

    def build(self):
        """(module tree on the meta device, tokenizer or None, padding side) from the manifest."""
        import transformers

        manifest = self.manifest()
        if manifest["kind"] != "language":
            raise InterlaceError(f"'{self.model}' is not a language model; wrap the same module here with "
                                 "interlace.Model(module) and trace it with backend=RemoteBackend(...)")
        settings = dict(manifest["config"])
        config = transformers.AutoConfig.for_model(settings.pop("model_type"), **settings)
        with torch.device("meta"):
            module = transformers.AutoModelForCausalLM.from_config(config)
        if [[path, type(sub).__name__] for path, sub in module.named_modules()] != [list(m) for m in manifest["modules"]]:
            raise InterlaceError(
                f"the module tree built here from the config of '{self.model}' differs from the server's: "
                f"install the server's transformers version (this is {transformers.__version__})")
        tokenizer = None
        if manifest["tokenizer"]:
            with tempfile.TemporaryDirectory() as folder:
                for name, text in manifest["tokenizer"].items():
                    with open(os.path.join(folder, os.path.basename(name)), "w", encoding="utf-8") as file:
                        file.write(text)
                tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        return module.eval(), tokenizer, manifest["padding_side"] or "left"

    # -- running --------------------------------------------------------------------------------------
    def run(self, request: Request, *, blocking: bool = True, timeout: float | None = None):
        """Submit `request`; its `Outcome` when blocking, else a `Job` to ask later.

        timeout: seconds the job may run on the server (its deadline, at most the server's max_seconds).
        """
        data = self._encode(request)
        params = {"model": self.model, "wait": _FIRST_WAIT if blocking else 0}
        if timeout is not None:
            params["timeout"] = timeout
        # the same key on a submission sent again gives the job of the first, not a second one
        submit = {"params": params, "content": data, "answered": (200, 202),
                  "headers": {"Idempotency-Key": secrets.token_urlsafe(16)}}
        try:
            response = self._call("POST", "/v1/jobs", **submit)
        except KeyboardInterrupt:  # while the server held the answer (its first second): find the job it made
            response = self._call("POST", "/v1/jobs", **{**submit, "params": {**params, "wait": 0}})
            self._stopped_waiting(Job(self, response.headers["interlace-job"]))
            raise
        job = Job(self, response.headers["interlace-job"])
        if response.status_code == 200:
            job._outcome = _outcome(response)
        if not blocking:
            return job
        try:
            return job._wait(None)  # the server holds the job to `timeout`; the queue before it is bounded
        except KeyboardInterrupt:
            self._stopped_waiting(job)
            raise

    def _stopped_waiting(self, job: "Job") -> None:
        """Ctrl-C in a blocking run: the job goes on at the server; say how to get it or stop it."""
        print(f"\ninterlace: stopped waiting; job {job.id} goes on at {self.host}. Fetch it later with "
              f"model.job({job.id!r}).result() (saved values by node), or stop it with "
              f"model.job({job.id!r}).cancel()", file=sys.stderr, flush=True)

    def _encode(self, request: Request) -> bytes:
        manifest = self.manifest()
        return serialize_request(request, trusted=manifest["trusted"], version=self._wire_version)

    def job(self, job_id: str) -> "Job":
        """The handle of a job submitted earlier (by its id)."""
        return Job(self, job_id)

    def stream(self, request: Request, *, timeout: float | None = None):
        """Submit `request` now; returns its `Job` and a generator of each generation `Step` as the server
        makes it, which returns the `Outcome`. Closing it before the end (a reader that stops) cancels the job.

        timeout: seconds the job may run on the server (as in `run`).
        """
        data = self._encode(request)
        params = {"model": self.model, "wait": 0, "stream": "true"}
        if timeout is not None:
            params["timeout"] = timeout
        # the answer is the job's event stream (one request, not two); a server older than that answers 202
        post = self._client.build_request("POST", "/v1/jobs", params=params, content=data,
                                          headers={"Accept": "text/event-stream"}, timeout=_STREAM_TIMEOUT)
        try:
            response = self._client.send(post, stream=True)
        except httpx.TransportError as error:
            raise self._unreachable(error) from None
        if response.status_code not in (200, 202):
            response.read()
            raise _error(response)
        job = Job(self, response.headers["interlace-job"])
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            response.close()
            response = None
        steps = self._steps(job, response)  # submitted now; its steps are read as the caller iterates
        if response is not None:
            weakref.finalize(steps, response.close)  # a stream nobody reads frees its connection with it
        return job, steps

    def _steps(self, job: "Job", events: httpx.Response | None):
        """`events`: the job's open event stream, or None to open one."""
        finished = False
        try:
            try:
                if events is None:
                    events = self._client.send(self._client.build_request(
                        "GET", f"/v1/jobs/{job.id}/events", timeout=_STREAM_TIMEOUT), stream=True)
                    if events.status_code != 200:
                        events.read()
                        raise _error(events)
                seen = -1  # a job that a batch could not serve runs again alone: its steps start over
                # read to the end, which comes right after the final event: the connection then serves again
                for kind, event in _events(events.iter_lines()):
                    if kind == "step":
                        step = deserialize_step(event, limits=Limits())
                        if step.index > seen:
                            seen = step.index
                            yield step
                    elif kind == "end":  # the server stops (SIGTERM) before the job ran: nobody will read it later
                        raise ServiceError(f"the server at {self.host} is stopping and job {job.id} did not run "
                                           f"({event['state']}); the stream gives it up: submit it again once the "
                                           "server is back", status=503, code="shutting_down")
            except httpx.TransportError as error:
                raise ServiceError(f"lost the connection to {self.host} while streaming job {job.id}: {error}",
                                   status=0, code="unreachable") from None
            finally:
                if events is not None:
                    events.close()
            outcome = _outcome(self._call("GET", f"/v1/jobs/{job.id}/result"))  # the job's error, if it failed
            finished = True
            return outcome
        finally:
            if not finished:
                self._cancel_quietly(job)

    def _cancel_quietly(self, job: "Job") -> None:
        """Cancel a job whose reader left; the server may be gone already, which is no further error."""
        try:
            job.cancel()
        except InterlaceError:
            pass

    def _call(self, method: str, path: str, *, answered=(200,), **options) -> httpx.Response:
        try:
            response = self._client.request(method, path, **options)
        except httpx.TransportError as error:
            raise self._unreachable(error) from None
        if response.status_code not in answered:
            raise _error(response)
        return response

    def _unreachable(self, error: httpx.TransportError) -> ServiceError:
        if "CERTIFICATE_VERIFY_FAILED" in str(error):
            advice = ("The server's certificate is not trusted here: set SSL_CERT_FILE to the PEM file of the "
                      "authority that signed it (its own certificate, when self-signed)")
        elif self.host.startswith("http://") and isinstance(error, httpx.RemoteProtocolError):
            advice = "Does the server take https://? (it does when started with --ssl-certfile)"
        else:
            advice = "Is `interlace serve` running there?"
        return ServiceError(f"cannot reach the interlace server at {self.host}: {str(error).rstrip('.')}. {advice}",
                            status=0, code="unreachable")

    def _follow(self, job: "Job", deadline: float | None) -> None:
        """Wait for the job's final event, showing its queue position and state."""
        status = _Status(job.id, self.progress)
        try:
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError
                read = 30.0 if left is None else min(left, 30.0)  # the server pings every 15 s
                with self._client.stream("GET", f"/v1/jobs/{job.id}/events",
                                         timeout=httpx.Timeout(read, connect=10.0)) as response:
                    if response.status_code != 200:
                        response.read()
                        raise _error(response)
                    finished = False  # the stream is read to its end, right after the final event (see _steps)
                    for kind, data in _events(response.iter_lines()):
                        status.show(kind, data)
                        finished = finished or kind in _FINISHED
                        if not finished and deadline is not None and time.monotonic() > deadline:
                            raise TimeoutError
                if finished:
                    return
        except (TimeoutError, httpx.ReadTimeout):
            raise LimitError(f"job {job.id} is not finished after {job.timeout:g} s; it goes on: ask again with "
                             "job.result(), or stop it with job.cancel()") from None
        except httpx.TransportError as error:
            raise ServiceError(
                f"lost the connection to {self.host} while waiting for job {job.id}: {error}. The server keeps its "
                f"jobs across a restart: once it answers, fetch it with model.job({job.id!r}).result() (one that was "
                "running when the server stopped ends with server_restarted: submit it again)",
                status=0, code="unreachable") from None
        finally:
            status.close()


class Job:
    """A submitted request: `status()`, `result()` (waits, then binds saved values), `cancel()`.

    From `with model.trace(..., remote=True, blocking=False) as tracer:`, the handle is `tracer.job`;
    `tracer.job.result()` binds the saved values into the caller's names, as a blocking trace would.
    """

    def __init__(self, backend: RemoteBackend, job_id: str):
        self.backend, self.id = backend, job_id
        self.timeout: float | None = None
        self._outcome = None
        self._receivers: list = []  # tracer callbacks: (outcome, frame) -> bind saved values

    def __repr__(self) -> str:
        return f"<interlace job {self.id} on {self.backend.host}>"

    def status(self) -> dict:
        """The job's state (queued, running, completed, error, cancelled), queue position and times."""
        return self.backend._call("GET", f"/v1/jobs/{self.id}").json()

    def cancel(self) -> dict:
        """Cancel it: at once while queued, at its next operation while running."""
        return self.backend._call("DELETE", f"/v1/jobs/{self.id}").json()

    def on_result(self, receiver) -> "Job":
        self._receivers.append(receiver)
        return self

    def result(self, timeout: float | None = None):
        """Wait for the job and return its `Outcome`; saved values bind as locally.

        timeout: seconds to wait here; past them a LimitError says the job goes on.
        """
        outcome = self._wait(timeout)
        for receiver in self._receivers:
            receiver(outcome, sys._getframe(1))
        return outcome

    def _wait(self, timeout: float | None):
        if self._outcome is None:
            self.timeout = timeout
            deadline = None if timeout is None else time.monotonic() + timeout
            self.backend._follow(self, deadline)
            self._outcome = _outcome(self.backend._call("GET", f"/v1/jobs/{self.id}/result"))
        return self._outcome


def _outcome(response: httpx.Response):
    values, logs = deserialize_results(response.content, limits=Limits())
    missing = {}
    for reason, indices in json.loads(response.headers.get("interlace-missing", "{}")).items():
        missing.update({index: reason for index in indices})
    for _, logged in logs:
        print(*logged)  # `tracer.log` prints on the client, as in a local run
    return Outcome(values, logs, missing)


def _error(response: httpx.Response, *, quote: bool = True) -> InterlaceError:
    """The error a server's answer stands for, as the class a local run raises.

    quote: give each `file.py:12` it names that line's text, read here (the client: the user's own files).
    A server that decodes its worker's answers says False: a location from a stranger is just text."""
    try:
        body = response.json()
        code, message, node, hint = body["code"], body["message"], body.get("node"), body.get("hint")
    except (ValueError, KeyError, TypeError):
        return ServiceError(f"the server answered {response.status_code}: {response.text[:200]}",
                            status=response.status_code, code="http_error")
    if quote:
        message = quote_sources(message)
    retry = response.headers.get("retry-after", "")
    if retry.isdigit():  # the header is out of a caller's sight: the message says it
        message += f"; retry in {retry} s"
    kind = getattr(errors, code, None)
    if isinstance(kind, type) and issubclass(kind, InterlaceError) and kind is not ServiceError:
        error = kind(message + (f"\n  hint: {hint}" if hint and response.status_code != 422 else ""))
    else:
        error = ServiceError(f"{message}" + (f"\n  hint: {hint}" if hint else ""), status=response.status_code,
                             code=code)
        error.retry_after = int(retry) if retry.isdigit() else None
    error.node = node
    return error


def _events(lines):
    """(kind, data) for each server-sent event; (None, None) for a keep-alive comment."""
    kind, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield kind, json.loads("\n".join(data))
            kind, data = "message", []
        elif line.startswith(":"):
            yield None, None
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


class _Status:
    """One status line on stderr (tqdm) while a blocking call waits: queue position, then state."""

    def __init__(self, job_id: str, enabled: bool):
        self.job_id, self.enabled, self.bar = job_id, enabled, None

    def show(self, kind, data) -> None:
        if not self.enabled or kind in (None, "log", "step"):
            return
        if self.bar is None:
            from tqdm import tqdm  # noqa: PLC0415 - only when a job has to wait

            # (disable=None: no status line where stderr is a file or a pipe, as in a log)
            self.bar = tqdm(total=0, bar_format="{desc}", file=sys.stderr, leave=False, disable=None)
        text = f"queued, position {data['position']}" if kind == "queued" else kind
        self.bar.set_description_str(f"interlace job {self.job_id[:8]}: {text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
