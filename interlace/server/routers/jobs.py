"""Jobs: submit (`POST /v1/jobs?wait=S`), status, events (server-sent), result, cancel (`DELETE`).

A submission's body is the bytes of a request (`serialize_request`). It is read up to the frame
limit, checked and queued; with `wait=S` the answer waits up to S seconds for the job and is then
its result (200, the bytes of `serialize_results`) or its id and state (202). Every job is readable
only with the key that submitted it: any other key gets the same 404 as an unknown id.
"""

from __future__ import annotations

import json
import logging

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.requests import ClientDisconnect

from ...errors import LimitError, ServiceError
from ..auth import caller, service
from ..errors import documented
from ..config import STARTED_WAIT, STREAM_CHECK
from ..jobs import FINISHED, STARTED, Job
from ..keys import Key
from ..schemas import JobInfo

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

log = logging.getLogger("interlace.server")

_RESULTS = "application/x-interlace-results"
_MISSING_HEADER_LIMIT = 8192  # bytes; past that the client gets a general reason


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it is known to be over `limit` bytes (before it is all read)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ServiceError("the Content-Length header is not a number", status=400, code="bad_request")
        if int(declared) > limit:
            raise LimitError(f"the request is {declared} bytes, over the limit of {limit} (max_frame_bytes)")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise LimitError(f"the request is over the limit of {limit} bytes (max_frame_bytes)")
            chunks.append(chunk)
    except ClientDisconnect:  # nobody is left to answer: one line in the log, no job
        log.info("a client hung up while sending a job (%d of %s bytes received)", size, declared or "?")
        raise ServiceError("the client hung up during the upload", status=400, code="client_disconnected") from None
    return b"".join(chunks)


def _answer(job: Job) -> Response:
    """The result of a finished job, its error, or (not finished) its state with 202."""
    if job.state == "completed":
        headers = {"Interlace-Job": job.id}
        if job.missing:
            reasons: dict[str, list[int]] = {}
            for index, why in job.missing.items():
                reasons.setdefault(why, []).append(index)
            text = json.dumps(reasons)
            if len(text) <= _MISSING_HEADER_LIMIT:
                headers["Interlace-Missing"] = text
        return Response(job.result, media_type=_RESULTS, headers=headers)
    if job.state in FINISHED:
        response = JSONResponse(job.error, status_code=job.status)
        response.headers["Interlace-Job"] = job.id
        return response
    return JSONResponse(JobInfo(**job.info()).model_dump(), status_code=202, headers={"Interlace-Job": job.id})


# what a job can end with, and so what its submission (with ?wait) and its result can answer
_JOB_ERRORS = documented(400, 401, 403, 404, 409, 410, 413, 422, 429, 500, 503, 504)
_BINARY = {"schema": {"type": "string", "format": "binary"}}


_EVENTS = {"schema": {"type": "string"}}


@router.post("", responses={200: {"content": {_RESULTS: _BINARY, "text/event-stream": _EVENTS},
                                  "description": "the result (wire format), or a streamed job's events"},
                            202: {"model": JobInfo, "description": "queued or running: its id and state"},
                            **_JOB_ERRORS},
             openapi_extra={"requestBody": {"required": True, "description": "the bytes of serialize_request",
                                            "content": {"application/octet-stream": _BINARY}}})
async def submit(request: Request, model: str | None = None, wait: float = Query(0.0, ge=0),
                 timeout: float | None = Query(None, gt=0), stream: bool = False,
                 idempotency_key: str | None = Header(None, max_length=200),
                 key: Key = Depends(caller), svc=Depends(service)):
    """Queue a request; with `wait`, answer with its result when it is done within that many seconds.

    `timeout` shortens the job's deadline (never past the server's max_seconds). A submission sent again
    with the same `Idempotency-Key` header gets the job of the first (while that job has not expired).
    `stream`: its events carry each generation step (`step`: tokens, text, the step's saved values in the
    wire format); with `Accept: text/event-stream` the answer is those events, as `GET /v1/jobs/{id}/events`
    would send them (the job's id in the `Interlace-Job` header), which saves the client a second request.
    """
    svc.refuse_if_draining()
    data = await _read_body(request, svc.model(model).limits.max_frame_bytes)
    job = await svc.submit(data, key.id, model, timeout, idempotency_key, stream)
    if stream and "text/event-stream" in request.headers.get("accept", ""):
        await job.wait(STARTED_WAIT, STARTED)  # (out of the queue, its job handed to the model)
        return EventSourceResponse(_events_of(job, svc), ping=15, headers={"Interlace-Job": job.id})
    if wait:
        await svc.wait(job, wait)
    return _answer(job)


@router.get("", response_model=list[JobInfo], responses=documented(401, 500))
def list_jobs(key: Key = Depends(caller), svc=Depends(service)):
    """The caller's jobs (until they expire), newest first."""
    return [job.info() for job in svc.store.of_key(key.id)]


@router.get("/{job_id}", response_model=JobInfo, responses=documented(400, 401, 404, 500))
def status(job_id: str, key: Key = Depends(caller), svc=Depends(service)):
    return svc.store.get(job_id, key.id).info()


@router.get("/{job_id}/result", responses={200: {"content": {_RESULTS: _BINARY}, "description": "the result"},
                                           202: {"model": JobInfo, "description": "not finished: its state"},
                                           **_JOB_ERRORS})
async def result(job_id: str, wait: float = Query(0.0, ge=0), key: Key = Depends(caller), svc=Depends(service)):
    """The result (200), the job's error (its status), or with 202 its state while it is not finished."""
    job = svc.store.get(job_id, key.id)
    if wait:
        await svc.wait(job, wait)
    return _answer(job)


@router.get("/{job_id}/events", response_class=EventSourceResponse,
            responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                             "description": "server-sent events"}, **documented(400, 401, 404, 500)})
async def events(job_id: str, key: Key = Depends(caller), svc=Depends(service)):
    """Server-sent events: queued (with position), running, step (streamed jobs), log, then completed, error
    or cancelled; or, when the server stops first, `end` with the job's state (a queued job stays queued for
    the next start)."""
    return EventSourceResponse(_events_of(svc.store.get(job_id, key.id), svc), ping=15)


async def _events_of(job: Job, svc):
    """A job's events from its first, until it finishes or the server stops. A streamed job whose reader
    goes away (closed its connection, or died) is cancelled: nobody reads its steps."""
    seen, ended = 0, False
    try:
        with svc.listening():
            while True:
                new = await job.next_events(seen, STREAM_CHECK)
                seen += len(new)
                for kind, data in new:
                    yield {"event": kind, "data": json.dumps(data)}
                    if kind in FINISHED:
                        ended = True
                        return
                if svc.closing:
                    ended = True
                    yield {"event": "end", "data": json.dumps({
                        "state": job.state, "message": "the server is stopping; the job is kept: ask for it again "
                                                       "(GET /v1/jobs/{id}) once the server is back"})}
                    return
    finally:
        if not ended and job.stream and job.state not in FINISHED:
            svc.cancel(job, "the job was cancelled: its reader went away")


@router.delete("/{job_id}", response_model=JobInfo, responses=documented(400, 401, 404, 500))
def cancel(job_id: str, key: Key = Depends(caller), svc=Depends(service)):
    """Cancel a queued job at once, a running one at its next operation; a finished one is left as is."""
    job = svc.store.get(job_id, key.id)
    if job.state not in FINISHED:
        svc.cancel(job)
    return job.info()
