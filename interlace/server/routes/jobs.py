"""Jobs: submit (`POST /v1/jobs?wait=S`), state, events (server-sent), result, cancel.

A submission is read (bounded), loaded and checked against the model, admitted for its key and
queued, all before the answer; `wait=S` holds the answer up to S seconds for the result. Results
are the bytes of `serialize_results`; errors are JSON `{code, message, node, hint}`.
"""

from __future__ import annotations

import json

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse

from ..app import Service, api_key, service
from ..errors import HTTPProblem
from ..jobs import Job
from ..keys import KeyInfo

router = APIRouter(prefix="/v1/jobs")


@router.post("")
async def submit(request: Request, model: str | None = None, wait: float = Query(0.0, ge=0, le=600),
                 key: KeyInfo = Depends(api_key), service: Service = Depends(service)) -> Response:
    hosted = service.model(model)
    body = await _read(request, service.settings.limits.max_frame_bytes)
    job = await anyio.to_thread.run_sync(_accept, service, hosted, key, body)
    if wait and not job.done:
        await anyio.to_thread.run_sync(job.wait, wait)
    if job.done:
        return _result(job)
    return JSONResponse(job.status(service.workers[job.model_id].position(job)), status_code=202,
                        headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("/{job_id}")
def status(job_id: str, key: KeyInfo = Depends(api_key), service: Service = Depends(service)) -> dict:
    job = service.jobs.get(job_id, key.id)
    return job.status(service.workers[job.model_id].position(job))


@router.get("/{job_id}/result")
def result(job_id: str, key: KeyInfo = Depends(api_key), service: Service = Depends(service)) -> Response:
    return _result(service.jobs.get(job_id, key.id))


@router.delete("/{job_id}")
def cancel(job_id: str, key: KeyInfo = Depends(api_key), service: Service = Depends(service)) -> dict:
    job = service.jobs.get(job_id, key.id)
    if not job.done:
        service.workers[job.model_id].cancel(job)
    return job.status(None)


@router.get("/{job_id}/events")
def events(job_id: str, key: KeyInfo = Depends(api_key), service: Service = Depends(service)):
    job = service.jobs.get(job_id, key.id)

    async def stream():
        seen = 0
        while True:
            new = await anyio.to_thread.run_sync(job.events_after, seen, 15.0)
            for event in new:
                yield {"event": event["event"], "data": json.dumps(event)}
            seen += len(new)
            if job.done and seen >= len(job.events):
                return

    return EventSourceResponse(stream())


def _accept(service: Service, hosted, key: KeyInfo, body: bytes) -> Job:
    request = hosted.load(body)  # malformed, too large or invalid: answered now, never queued
    job = Job(key.id, hosted.id, request, len(body))
    service.admission.admit(key.id, job)
    try:
        service.workers[hosted.id].submit(job)
    except HTTPProblem as error:
        job.finish(error=error)  # not in flight: it does not count against the key
        raise
    service.jobs.add(job)
    service.metrics.submitted.labels(hosted.id).inc()
    return job


def _result(job: Job) -> Response:
    headers = {"X-Job-Id": job.id}
    if job.state == "completed":
        return Response(job.result, media_type="application/octet-stream", headers=headers)
    if job.error is not None:
        return JSONResponse(job.error.body(), status_code=job.error.status, headers=headers)
    return JSONResponse(job.status(None), status_code=202, headers=headers)


async def _read(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it is longer than `limit` (also when it lies about its length)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPProblem(413, "TooLarge", f"the request is {declared} bytes, over the limit of {limit} "
                          "(max_frame_bytes)", "send less: save fewer values, or split the work")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPProblem(413, "TooLarge", f"the request is over the limit of {limit} bytes (max_frame_bytes)",
                              "send less: save fewer values, or split the work")
    return bytes(body)
