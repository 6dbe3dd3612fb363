"""The FastAPI application: the service it serves, its dependencies, and the error handler.

`Service` holds what every request needs: the hosted models and their workers, the key store, the
job store, admission (rates), settings and metrics. Routers (`routes/`) reach it through the
`service` dependency; `api_key` checks the caller's key (header `Authorization: Bearer <key>` or
`X-API-Key`). Every error leaves through one handler that writes `{code, message, node, hint}`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .errors import HTTPProblem, problem
from .hosting import HostedModel
from .jobs import Admission, JobStore, Worker
from .keys import KeyInfo, KeyStore
from .metrics import Metrics
from .settings import ServerSettings


@dataclass
class Service:
    hosted: dict[str, HostedModel]
    keys: KeyStore
    settings: ServerSettings
    metrics: Metrics = field(default_factory=Metrics)
    workers: dict[str, Worker] = field(init=False)
    admission: Admission = field(init=False)
    jobs: JobStore = field(init=False)

    def __post_init__(self):
        self.workers = {name: Worker(hosted, self.settings, self.metrics) for name, hosted in self.hosted.items()}
        self.admission = Admission(self.settings)
        self.jobs = JobStore(self.settings)

    def model(self, model_id: str | None) -> HostedModel:
        if model_id is None and len(self.hosted) == 1:
            return next(iter(self.hosted.values()))
        if model_id not in self.hosted:
            raise HTTPProblem(404, "UnknownModel", f"this server hosts no model {model_id!r}; it hosts "
                              f"{', '.join(self.hosted)}", "GET /v1/models lists them")
        return self.hosted[model_id]

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()


def service(request: Request) -> Service:
    return request.app.state.service


def api_key(request: Request) -> KeyInfo:
    header = request.headers.get("authorization", "")
    key = header[7:] if header.lower().startswith("bearer ") else request.headers.get("x-api-key")
    info = service(request).keys.check(key)
    if info is None:
        raise HTTPProblem(401, "Unauthorized", "no API key, or not a valid one" if key else "no API key sent",
                          "send `Authorization: Bearer <key>`; an operator makes keys with `interlace keys create`")
    return info


def create_app(service_: Service) -> FastAPI:
    from .routes import health, jobs, models

    app = FastAPI(title="interlace", description="Runs intervention graphs on hosted models.")
    app.state.service = service_
    for router in (health.router, models.router, jobs.router):
        app.include_router(router)

    @app.exception_handler(HTTPProblem)
    async def _problem(request: Request, error: HTTPProblem) -> JSONResponse:
        service_.metrics.rejected.labels(error.code).inc()
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        answer = HTTPProblem(400, "BadRequest", f"invalid request: {error.errors()[:3]}", "check the query parameters")
        return await _problem(request, answer)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        return await _problem(request, problem(error))

    @app.on_event("shutdown")
    def _stop() -> None:
        service_.stop()

    return app
