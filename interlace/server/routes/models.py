"""`GET /v1/models` and `GET /v1/models/{id}/manifest`: what a client needs to build a model's envoys."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ..app import Service, api_key, service

router = APIRouter(prefix="/v1/models", dependencies=[Depends(api_key)])


@router.get("")
def models(service: Service = Depends(service)) -> list[dict]:
    return [hosted.describe() for hosted in service.hosted.values()]


@router.get("/{model_id}/manifest")
def manifest(model_id: str, service: Service = Depends(service)) -> dict:
    return service.model(model_id).manifest()
