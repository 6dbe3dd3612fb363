"""The one place that maps errors to HTTP status codes, and the JSON body every error is sent as.

Every refusal and every failed job reaches the client as `{code, message, node, hint}`: `code` is
the error's class name (`GraphError`, `LimitError`, ...; the client raises that class again) or, for
the service's own refusals (`ServiceError`), a short name such as `unauthorized` or `queue_full`.
`node` is the graph node at fault (index, op, target, location) when there is one.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import (
    CancelledError,
    GraphError,
    InterlaceError,
    LimitError,
    RefusedError,
    SerializationError,
    ServiceError,
    VersionError,
)
from .schemas import ErrorBody

log = logging.getLogger("interlace.server")

# most specific first; every other InterlaceError (a graph that failed while it ran) is a 422
_STATUS = (
    (VersionError, 409),
    (SerializationError, 400),
    (GraphError, 422),
    (RefusedError, 403),
    (CancelledError, 410),
)

_HINTS = {
    400: "the body must be the bytes of interlace.backends.serialize.serialize_request; use the "
         "interlace client (LanguageModel(name, host=..., api_key=...)) rather than hand-made requests",
    401: "pass api_key= (or set INTERLACE_API_KEY); the server's operator creates keys with "
         "`interlace keys create --db PATH --name NAME`",
    403: "this server runs graphs as data: use allowed operations (interlace.ops); user functions "
         "need a server started with --trusted",
    404: "job ids are readable only with the key that submitted them, until their results expire",
    409: "use the same interlace version as the server (GET /v1/health names it)",
    410: "the job was cancelled; submit it again",
    413: "send less, or ask the server's operator to raise the limit (GET /v1/models/{id}/manifest "
         "lists them; `interlace serve --help` names the flags)",
    422: "the node and your line are named above; the same trace run locally gives the same error",
    429: "wait and retry: see the Retry-After header",
    504: "the job ran past its deadline (max_seconds); make it smaller, or pass a larger timeout",
}


def documented(*statuses: int) -> dict:
    """The OpenAPI `responses` of a route for the error statuses it can send, each with `ErrorBody`."""
    return {status: {"model": ErrorBody, "description": _DESCRIPTIONS[status]} for status in statuses}


_DESCRIPTIONS = {
    400: "malformed request", 401: "no valid API key", 403: "refused: not allowed here", 404: "unknown (or another key's)",
    405: "method not allowed (see the Allow header)", 409: "another wire format version", 410: "the job was cancelled",
    413: "over a limit", 422: "an invalid graph, or one that failed while it ran (the node is named)",
    429: "rate, queue or jobs per key (see Retry-After)", 500: "the server failed",
    503: "shutting down, or the model replica stopped (see Retry-After)", 504: "the job ran past its deadline",
}


def status_of(error: Exception) -> int:
    """The HTTP status of an error (500 for anything that is not an InterlaceError)."""
    if isinstance(error, ServiceError):
        return error.status
    if isinstance(error, LimitError):
        return 504 if "max_seconds" in str(error) else 413  # a deadline is a LimitError naming max_seconds
    for kind, status in _STATUS:
        if isinstance(error, kind):
            return status
    return 422 if isinstance(error, InterlaceError) else 500


def error_body(error: Exception) -> dict:
    """`{code, message, node, hint}` for an error (an unexpected one says only that it happened)."""
    status = status_of(error)
    if status == 500:
        return {"code": "internal", "message": f"the server failed: {type(error).__name__} (see its log)",
                "node": None, "hint": "report this to the server's operator"}
    code = error.code if isinstance(error, ServiceError) else type(error).__name__
    hint = getattr(error, "hint", None) or _HINTS.get(status)  # an error may know better than its status
    return {"code": code, "message": str(error), "node": getattr(error, "node", None), "hint": hint}


def error_response(error: Exception) -> JSONResponse:
    status = status_of(error)
    retry = getattr(error, "retry_after", 1 if status == 429 else None)
    headers = {"Retry-After": str(retry)} if retry is not None else None
    return JSONResponse(error_body(error), status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    """Route every error, ours and the framework's, through `error_response`; the OpenAPI document says so
    (invalid parameters are a 400 `ErrorBody`, not FastAPI's 422 `HTTPValidationError`)."""
    framework_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = framework_openapi()
            for operations in schema["paths"].values():
                for operation in operations.values():
                    if "HTTPValidationError" in str(operation["responses"].get("422", "")):
                        del operation["responses"]["422"]
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi

    async def interlace_error(request: Request, error: InterlaceError):
        return error_response(error)

    async def http_error(request: Request, error: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        refused = ServiceError(str(error.detail), status=error.status_code, code=code)
        if error.status_code in (404, 405):  # the framework's: a route or method this server has not
            refused.hint = (f"this server has no {request.method} {request.url.path}: its routes are listed at "
                            "GET /docs (and /openapi.json)")
        response = error_response(refused)
        response.headers.update(error.headers or {})  # 405's Allow
        return response

    async def invalid(request: Request, error: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()[:3])
        refused = ServiceError(f"invalid request: {problems}", status=400, code="bad_request")
        refused.hint = "a parameter of the address or the query is not what the route takes (GET /docs lists them)"
        return error_response(refused)

    async def unexpected(request: Request, error: Exception):
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return error_response(error)

    app.add_exception_handler(InterlaceError, interlace_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, unexpected)
