"""The error hierarchy of the API and its one mapping to the error envelope.

Every error a client sees is `{"error": {"code", "message", "param"}}` with a
stable code from `latentd.contract.ErrorCode`. Nothing here ever puts a
traceback into a response; unexpected exceptions are logged and answered with
a bare `internal_error`.
"""

from __future__ import annotations

import email.message
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.json_body import TWICE
from latentd.contract import ErrorCode
from latentd.logs import event

log = logging.getLogger("latentd.api")

RETRY_AFTER_UNAVAILABLE = 2


class ErrorBody(BaseModel):
    code: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    """The one error envelope."""

    error: ErrorBody


class ServiceError(Exception):
    status_code = 500
    code = ErrorCode.INTERNAL_ERROR

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after: int | None = None,
        code: ErrorCode | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code


class InvalidRequest(ServiceError):
    status_code = 422
    code = ErrorCode.INVALID_REQUEST


class NotFound(ServiceError):
    status_code = 404
    code = ErrorCode.NOT_FOUND


class Expired(ServiceError):
    status_code = 404
    code = ErrorCode.EXPIRED


class ModelUnavailable(ServiceError):
    status_code = 400
    code = ErrorCode.MODEL_UNAVAILABLE


class QueueFull(ServiceError):
    status_code = 429
    code = ErrorCode.QUEUE_FULL


class NotCancelable(ServiceError):
    status_code = 409
    code = ErrorCode.NOT_CANCELABLE


class IdempotencyConflict(ServiceError):
    status_code = 409
    code = ErrorCode.IDEMPOTENCY_CONFLICT


class Unauthorized(ServiceError):
    status_code = 401
    code = ErrorCode.UNAUTHORIZED


class RateLimited(ServiceError):
    status_code = 429
    code = ErrorCode.RATE_LIMITED


class TooManyJobs(ServiceError):
    status_code = 429
    code = ErrorCode.TOO_MANY_JOBS


class NotReady(ServiceError):
    status_code = 409
    code = ErrorCode.NOT_READY


class ServiceUnavailable(ServiceError):
    status_code = 503
    code = ErrorCode.SERVICE_UNAVAILABLE


class WaitTimeout(ServiceError):
    status_code = 504
    code = ErrorCode.WAIT_TIMEOUT


def error_response(
    status_code: int,
    code: str,
    message: str,
    param: str | None = None,
    retry_after: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    headers = dict(headers or {})
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if status_code == 401:
        headers["WWW-Authenticate"] = "Bearer"
    body = ErrorResponse(error=ErrorBody(code=code, message=message, param=param))
    return JSONResponse(body.model_dump(), status_code=status_code, headers=headers)


def service_error_response(exc: ServiceError) -> JSONResponse:
    return error_response(exc.status_code, exc.code, exc.message, exc.param, exc.retry_after)


# What a lost connection to the job store raises: answered with 503 and Retry-After.
STORE_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


# What a job store that refuses writes raises: full (maxmemory, with the noeviction policy
# latentd requires) or a read-only replica. Also 503: the request was fine, the store is not.
STORE_REFUSES = (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError)


def store_down_response(exc: Exception, instead: str | None = None) -> JSONResponse:
    """503 with Retry-After; with `instead` (what to do rather than send the request again), none."""
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        event(log, "redis_full", logging.ERROR, error=type(exc).__name__)
        message, then = "the job store (Redis) is full (maxmemory reached) and takes no writes", "retry later"
    elif isinstance(exc, redis.exceptions.ReadOnlyError):
        event(log, "redis_read_only", logging.ERROR, error=type(exc).__name__)
        message, then = "the job store (Redis) is a read-only replica and takes no writes", "retry later"
    else:
        event(log, "redis_unavailable", logging.WARNING, error=type(exc).__name__)
        message, then = "the job store (Redis) is unreachable", "retry shortly"
    retry_after = None if instead else RETRY_AFTER_UNAVAILABLE
    return error_response(
        503, ErrorCode.SERVICE_UNAVAILABLE, f"{message}; {instead or then}", retry_after=retry_after
    )


def _is_json_media_type(content_type: str) -> bool:
    """FastAPI's own rule for a body it decodes as JSON: application/json or application/*+json,
    parameters and case aside (so text/json and application/x-ndjson are not)."""
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def _encoded(request: Request) -> JSONResponse | None:
    """For a body that is not JSON, sent compressed (gzip, say): bodies are read as sent, and the
    answer names the header rather than the bytes it made."""
    if request.headers.get("content-encoding", "identity").strip().lower() in ("", "identity"):
        return None
    return error_response(
        422,
        ErrorCode.INVALID_REQUEST,
        "request bodies are read as sent, not decoded: send the JSON without Content-Encoding",
        "Content-Encoding",
    )


def _param(loc: Sequence[Any]) -> str | None:
    if len(loc) == 2 and loc[0] == "header":  # as the header is written: Idempotency-Key
        return "-".join(word.capitalize() for word in str(loc[1]).split("-"))
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) if parts else None  # a field named "" is named so, not left out


_LONE_SURROGATE = "it holds a lone surrogate escape such as \\ud800"


def _field_given_twice(err: dict[str, Any]) -> str | None:
    """The field a body gives twice, as it may be shown: not one that cannot be written back as
    UTF-8 (a lone surrogate) or is too long to echo."""
    reason = str((err.get("ctx") or {}).get("error", ""))
    if err.get("type") != "json_invalid" or not reason.startswith(TWICE):
        return None
    name = reason.removeprefix(TWICE)
    try:
        name.encode()
    except UnicodeEncodeError:
        return "?"
    return name if len(name) <= 64 and name.isprintable() else "?"


def _validation_message(err: dict[str, Any]) -> str:
    if (twice := _field_given_twice(err)) is not None:
        shown = "a field name" if twice == "?" else f"'{twice}'"
        return f"the request body gives {shown} more than once; give each field once"
    if err.get("type") == "json_invalid":
        at = [p for p in err.get("loc", ()) if isinstance(p, int)]
        return "request body is not valid JSON" + (f" (at character {at[0]})" if at else "")
    if err.get("type") == "extra_forbidden":
        return f"unknown field '{_param(err.get('loc', ()))}'"
    field = _param(err.get("loc", ()))
    if err.get("type") == "string_unicode":  # a lone surrogate escape, "\ud800": never echoed
        if field is None:  # pydantic checks the keys of an object before it knows the field
            return f"a field name is not valid Unicode ({_LONE_SURROGATE})"
        return f"{field}: not valid Unicode ({_LONE_SURROGATE})"
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{field}: {msg}" if field else msg


_HTTP_CODES = {
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
}
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request, path: str | None = None) -> list[str]:
    """Every method some route answers at this path (or at `path`). Starlette's own Allow header
    names only the first route whose path matches: for an image, GET without the HEAD route."""
    routes = request.app.router.routes
    scope = {**request.scope, "path": path or request.scope["path"]}
    return [
        method
        for method in _METHODS
        if any(route.matches({**scope, "method": method})[0] is Match.FULL for route in routes)
    ]


# Response headers, as the OpenAPI document declares them: name -> OpenAPI header object.
Headers = dict[str, dict[str, Any]]


def header(description: str, kind: str = "string") -> dict[str, Any]:
    """A header every response of its route and status carries (`maybe` for some of them)."""
    return {"description": description, "required": True, "schema": {"type": kind}}


def maybe(headers: Headers) -> Headers:
    """`headers`, carried by some responses of a route and status, not every one."""
    return {name: {**declared, "required": False} for name, declared in headers.items()}


RETRY_AFTER: Headers = {"Retry-After": header("Seconds to wait before sending it again.", "integer")}
# On every 401 (`error_response`), as RFC 9110 asks.
WWW_AUTHENTICATE: Headers = {"WWW-Authenticate": header("`Bearer`: send `Authorization: Bearer <key>`.")}


def _error(description: str, headers: Headers | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"model": ErrorResponse, "description": description}
    if headers:
        response["headers"] = headers
    return response


# The submit routes' 400 for a model, as their OpenAPI descriptions say it.
MODEL_UNAVAILABLE_400 = (
    "No live worker serves the model, and none did within the hour "
    "(`model_unavailable`; one that did answers 503 with Retry-After)"
)
# Both submit routes' 409 for an Idempotency-Key.
IDEMPOTENCY_CONFLICT_409 = (
    "Idempotency-Key reused with another body, or whose first request is still being accepted "
    "(`idempotency_conflict`; the latter with Retry-After)"
)
STORE_UNAVAILABLE_503 = (
    "Redis unreachable or refusing writes (`service_unavailable`); retry after `Retry-After` seconds"
)
# The submit routes' 503s, as their OpenAPI descriptions say them.
SUBMIT_UNAVAILABLE_503 = (
    STORE_UNAVAILABLE_503 + ". Or the model's worker is restarting or loading (`model_unavailable`), "
    "also with `Retry-After`"
)

# Documented on every route that authenticates its caller: each can produce them.
COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: _error(
        "API keys exist and this request has none, or a wrong one (`unauthorized`).", WWW_AUTHENTICATE
    ),
    429: _error("The API key spent its requests this minute (`rate_limited`); see Retry-After.", RETRY_AFTER),
    500: _error("A fault of the service itself (`internal_error`); the API's log has the details."),
    503: _error(STORE_UNAVAILABLE_503 + ".", RETRY_AFTER),
}
# Documented on every route that validates a query, a header or a body.
INVALID_REQUEST_422: dict[int | str, dict[str, Any]] = {
    422: _error("Invalid request (`invalid_request`); `param` names the field."),
}
# Documented on both submit routes, besides their own.
SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **COMMON_RESPONSES,
    **INVALID_REQUEST_422,
    413: _error("The body is over LATENTD_MAX_BODY_BYTES (`payload_too_large`)."),
    429: _error(
        "The API key spent its requests this minute (`rate_limited`) or has LATENTD_MAX_JOBS_IN_FLIGHT "
        "jobs queued or running (`too_many_jobs`), or the model's queue is full (`queue_full`); "
        "see Retry-After.",
        RETRY_AFTER,
    ),
    503: _error(SUBMIT_UNAVAILABLE_503 + ".", RETRY_AFTER),
}


def install_error_handlers(app: FastAPI, authenticate: Callable[[Request], Awaitable[object]]) -> None:
    """`authenticate` is run for a body that cannot be decoded: FastAPI decodes the body before it
    runs a route's dependencies, and a caller without a valid key must get 401 either way."""

    async def _refused(request: Request) -> JSONResponse | None:
        if not request.url.path.startswith("/v1/"):
            return None
        try:
            await authenticate(request)
        except ServiceError as exc:
            return service_error_response(exc)
        return None

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return service_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid" and (refused := await _refused(request)):
            return refused
        if first.get("type") == "json_invalid" and (encoded := _encoded(request)):
            return encoded
        if tuple(first.get("loc", ())) == ("body",):  # the body as a whole: absent, or not JSON
            if not _is_json_media_type(request.headers.get("content-type", "")):
                return error_response(
                    422,
                    ErrorCode.INVALID_REQUEST,
                    "send the request body as JSON, with the header Content-Type: application/json",
                    "Content-Type",
                )
            if first.get("type") == "missing":
                return error_response(
                    422, ErrorCode.INVALID_REQUEST, "the request body (a JSON object) is missing"
                )
            if first.get("type") in ("model_type", "model_attributes_type"):  # JSON, not an object
                return error_response(
                    422, ErrorCode.INVALID_REQUEST, "the request body must be a JSON object"
                )
        message = "; ".join(_validation_message(e) for e in errors[:5]) or "invalid request"
        if (twice := _field_given_twice(first)) is not None:
            param = None if twice == "?" else twice
        else:
            param = None if first.get("type") == "json_invalid" else _param(first.get("loc", ()))
        return error_response(422, ErrorCode.INVALID_REQUEST, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI's answer to a body it cannot decode
            if refused := await _refused(request):
                return refused
            return _encoded(request) or error_response(
                422,
                ErrorCode.INVALID_REQUEST,
                "request body cannot be read as JSON: not UTF-8, nested too deeply, or a number too long",
            )
        code = _HTTP_CODES.get(exc.status_code, ErrorCode.HTTP_ERROR)
        headers = dict(exc.headers or {})
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":  # the router's: no route at this path
            path = request.url.path
            message = f"no route at {path}"
            if len(path) > 1 and path.endswith("/") and _allowed_methods(request, request.scope["path"][:-1]):
                message += "; routes take no trailing slash"
        if exc.status_code == 405:
            allowed = _allowed_methods(request) or [m.strip() for m in headers.get("Allow", "").split(",")]
            headers["Allow"] = ", ".join(allowed)
            message = f"method {request.method} is not allowed here; this route takes {headers['Allow']}"
        return error_response(exc.status_code, code, message, headers=headers)

    async def _redis_down(_: Request, exc: Exception) -> JSONResponse:
        return store_down_response(exc)

    for kind in (*STORE_DOWN, *STORE_REFUSES):
        app.add_exception_handler(kind, _redis_down)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return internal_error_response(request, exc)


def internal_error_response(
    request: Request, exc: Exception, message: str = "internal error"
) -> JSONResponse:
    """A fault of the service itself, `exc` being handled: logged with its traceback and counted."""
    log.error("unhandled_error path=%s", request.url.path, exc_info=exc)
    if (metrics := getattr(request.app.state, "metrics", None)) is not None:
        metrics.internal_errors.inc()
    return error_response(500, ErrorCode.INTERNAL_ERROR, f"{message}; the server log has details")
