"""The only place that chooses status codes: domain errors → status + the route family's error body."""

from __future__ import annotations

import logging
from enum import Enum

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from inferd.api.cancellation import ClientDisconnected
from inferd.api.context import current_request_id
from inferd.api.responses import FastJSONResponse
from inferd.errors import (
    AuthenticationError,
    BodyTimeoutError,
    EngineError,
    EngineUnavailableError,
    InferdError,
    InputTooLongError,
    InsufficientMemoryError,
    ModelLoadError,
    ModelNotFoundError,
    ModelTooLargeError,
    OverloadedError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    RequestTimeoutError,
    ShuttingDownError,
    SlowReaderError,
    UnsupportedTaskError,
)

log = logging.getLogger("inferd.api")


class Family(str, Enum):
    OPENAI = "openai"
    TEI = "tei"
    COHERE = "cohere"
    OLLAMA = "ollama"


_TEI_PATHS = {"/embed", "/rerank"}
_COHERE_PATHS = {"/v1/rerank", "/v2/rerank"}


def family_of(path: str) -> Family:
    if path in _TEI_PATHS:
        return Family.TEI
    if path in _COHERE_PATHS:
        return Family.COHERE
    if path.startswith("/api/"):
        return Family.OLLAMA
    return Family.OPENAI


# (status, OpenAI type, OpenAI code, TEI error_type) per domain error; the first match wins.
_TABLE: list[tuple[type[InferdError], int, str, str | None, str]] = [
    (AuthenticationError, 401, "invalid_request_error", "invalid_api_key", "Unauthorized"),
    (PermissionDeniedError, 403, "invalid_request_error", "permission_denied", "Unauthorized"),
    (PayloadTooLargeError, 413, "invalid_request_error", "request_too_large", "Validation"),
    (RateLimitError, 429, "rate_limit_error", "rate_limit_exceeded", "Overloaded"),
    (ShuttingDownError, 503, "server_error", "service_unavailable", "Unhealthy"),
    (RequestTimeoutError, 504, "server_error", "timeout", "Backend"),
    (SlowReaderError, 408, "invalid_request_error", "slow_reader", "Validation"),
    (BodyTimeoutError, 408, "invalid_request_error", "body_timeout", "Validation"),
    (InputTooLongError, 400, "invalid_request_error", "context_length_exceeded", "Validation"),
    (ModelNotFoundError, 404, "invalid_request_error", "model_not_found", "Validation"),
    (ModelTooLargeError, 400, "invalid_request_error", "model_too_large", "Validation"),
    (InsufficientMemoryError, 409, "invalid_request_error", "insufficient_memory", "Overloaded"),
    (UnsupportedTaskError, 400, "invalid_request_error", "model_not_supported", "Validation"),
    (OverloadedError, 429, "rate_limit_error", "server_overloaded", "Overloaded"),
    (EngineUnavailableError, 503, "server_error", "service_unavailable", "Unhealthy"),
    (ModelLoadError, 503, "server_error", "model_load_failed", "Unhealthy"),
    (EngineError, 500, "server_error", None, "Backend"),
    (InferdError, 400, "invalid_request_error", None, "Validation"),
]


def error_response(
    family: Family,
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    tei_type: str = "Validation",
    headers: dict[str, str] | None = None,
) -> FastJSONResponse:
    if family is Family.TEI:
        body: dict = {"error": message, "error_type": tei_type}
    elif family is Family.OLLAMA:
        body = {"error": message}
    elif family is Family.COHERE:
        body = {"message": message}
    else:
        body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return FastJSONResponse(body, status_code=status, headers=headers)


async def _domain_error(request: Request, exc: InferdError) -> FastJSONResponse:
    return domain_error_response(request.url.path, exc)


def openai_error(exc: InferdError) -> dict:
    """A domain error as OpenAI's error object (a stream's error event carries one)."""
    _, _, type_, code, _ = next(row for row in _TABLE if isinstance(exc, row[0]))
    return {"message": exc.message, "type": type_, "param": exc.param, "code": code}


def domain_error_response(path: str, exc: InferdError) -> FastJSONResponse:
    """The status and body a domain error gets on ``path``'s route family."""
    family = family_of(path)
    _, status, type_, code, tei_type = next(row for row in _TABLE if isinstance(exc, row[0]))
    if family is Family.TEI and isinstance(exc, InputTooLongError):
        status = 413  # TEI answers over-long inputs with Payload Too Large
    elif family is Family.TEI and status == 400:
        status = 422
    retry_after = getattr(exc, "retry_after", None)
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    if status >= 500 and status != 503:
        log.error("request %s on %s failed: %s", current_request_id(), path, exc.message)
    return error_response(
        family,
        status,
        exc.message,
        type_=type_,
        param=exc.param,
        code=code,
        tei_type=tei_type,
        headers=headers,
    )


async def _validation_error(request: Request, exc: RequestValidationError) -> FastJSONResponse:
    family = family_of(request.url.path)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return error_response(
            family, 400, f"the body is not valid JSON: {first.get('msg')}", tei_type="Validation"
        )
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = "; ".join(_describe(e) for e in errors[:5])
    status = 422 if family is Family.TEI else 400
    return error_response(family, status, message, param=param, tei_type="Validation")


def _describe(error: dict) -> str:
    loc = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
    return f"{loc}: {error.get('msg')}" if loc else str(error.get("msg"))


async def _http_error(request: Request, exc: StarletteHTTPException) -> FastJSONResponse:
    family = family_of(request.url.path)
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(
        family, exc.status_code, str(exc.detail), type_=type_, headers=getattr(exc, "headers", None)
    )


async def _unexpected_error(request: Request, exc: Exception) -> FastJSONResponse:
    return unexpected_error_response(request.url.path, exc)


def unexpected_error_response(path: str, exc: BaseException) -> FastJSONResponse:
    """A bug: logged once with its traceback and request id, answered with one 500."""
    log.error("unexpected error on %s (request id %s)", path, current_request_id(), exc_info=exc)
    return error_response(
        family_of(path), 500, "internal server error", type_="server_error", tei_type="Backend"
    )


async def _disconnected(request: Request, exc: ClientDisconnected) -> Response:
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


def install_error_handlers(app: FastAPI) -> None:
    # The handlers are async: Starlette runs plain functions in its thread pool, a hop per error.
    app.add_exception_handler(ClientDisconnected, _disconnected)
    app.add_exception_handler(InferdError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
