"""`GET /v1/health` (no key needed) and `GET /metrics` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ...backends.serialize import VERSION
from ..app import Service, service

router = APIRouter()


@router.get("/v1/health")
def health(service: Service = Depends(service)) -> dict:
    return {"status": "ok", "wire_version": VERSION, "models": list(service.hosted)}


@router.get("/metrics")
def metrics(service: Service = Depends(service)) -> Response:
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
