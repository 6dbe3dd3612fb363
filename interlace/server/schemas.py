"""The JSON bodies of the API, as pydantic models (request and result graphs travel as wire-format bytes)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorBody(BaseModel):
    code: str  # the error class (GraphError, ...) or the service's reason (unauthorized, queue_full, ...)
    message: str
    node: dict | None = None  # index, op, target, location of the node at fault
    hint: str | None = None


class Health(BaseModel):
    status: str  # "ok", or "model_damaged" while a model refuses jobs until the server is restarted
    interlace: str
    wire_version: int  # the frozen version 1, which every client writes (see Manifest)
    wire_versions: list[int]
    models: list[str]
    queued: dict[str, int]
    running: dict[str, int]  # jobs running now, per model
    checked_jobs: int | None = None  # jobs after which the weights were checked (--check-weights)
    model_changes: list[str] | None = None  # what any job left on a hosted model (expected: none)
    model_damage: list[str] = []  # weights jobs changed past the write check, and whether they were reloaded
    worker_restarts: dict[str, dict[str, int]] = {}  # per model: why its worker process was started again, times


class ModelSummary(BaseModel):
    id: str
    kind: str
    type: str
    parameters: int


class Manifest(BaseModel):
    id: str
    interlace: str
    wire_version: int  # 1: a client of any version can talk to this server; `wire_versions` are all it reads
    wire_versions: list[int]
    trusted: bool
    kind: str
    modules: list[tuple[str, str]]  # (path, class name) of every module
    limits: dict[str, int | float]
    config: dict[str, Any] | None  # the transformers config, for LanguageModel
    tokenizer: dict[str, str]  # file name -> text, as save_pretrained writes them
    padding_side: str | None
    standardized: dict[str, bool] | None = None  # a StandardizedTransformer's options ({"attention_probs": ...})
    source: dict[str, list[str]] = {}  # module class -> the `.source` points of its forward


class JobInfo(BaseModel):
    id: str
    model: str
    state: str  # queued, running, completed, error, cancelled
    position: int | None  # 1 = next, while queued
    created: float
    started: float | None
    finished: float | None
    error: ErrorBody | None
    missing: dict[str, str]  # saved node -> why it has no value
