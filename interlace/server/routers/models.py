"""The hosted models: `GET /v1/models` and `GET /v1/models/{id}/manifest` (what a client builds from)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from ..auth import caller, service
from ..errors import documented
from ..schemas import Manifest, ModelSummary

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Depends(caller)])


@router.get("", response_model=list[ModelSummary], responses=documented(401, 500))
def list_models(svc=Depends(service)):
    return [hosted.summary() for hosted in svc.models.values()]


@router.get("/{model_id:path}/manifest", response_model=Manifest, responses=documented(400, 401, 404, 500))
async def manifest(model_id: str, svc=Depends(service)):
    return await run_in_threadpool(svc.model(model_id).manifest)
