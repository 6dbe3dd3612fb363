"""The server's own state: `GET /v1/health` (no key needed) and `GET /metrics` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from ...backends.remote import package_version
from ...backends.serialize import SUPPORTED_VERSIONS
from ..auth import service
from ..errors import documented
from ..schemas import Health

router = APIRouter(tags=["health"])


@router.get("/v1/health", response_model=Health, responses=documented(500))
def health(svc=Depends(service)) -> Health:
    checking = [m for m in svc.models.values() if m.checksum is not None]
    broken = any(m.broken for m in svc.models.values())
    # a worker's batch is running once the model has it; before (a worker process restarting) it waits, as queued
    taken = {name: [job for w in svc.workers if w.name == f"interlace-worker-{name}" for job in w.current]
             for name in svc.models}
    return Health(
        status="model_damaged" if broken else "ok", interlace=package_version(), wire_version=SUPPORTED_VERSIONS[0],
        wire_versions=list(SUPPORTED_VERSIONS), models=list(svc.models),
        queued={name: len(queue) + sum(job.state == "queued" for job in taken[name])
                for name, queue in svc.queues.items()},
        running={name: sum(job.state == "running" for job in taken[name]) for name in svc.models},
        checked_jobs=sum(m.checked for m in checking) if checking else None,
        model_changes=[change for m in checking for change in m.changes] if checking else None,
        model_damage=[f"{m.name}: {line}" for m in svc.models.values() for line in m.damage()],
        worker_restarts={m.name: dict(m.worker_restarts) for m in svc.models.values() if m.worker_restarts},
    )


@router.get("/metrics", response_class=Response, responses={
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus' text format"},
    **documented(500)})
def metrics(svc=Depends(service)) -> Response:
    return Response(svc.metrics.render(), media_type=svc.metrics.content_type)
