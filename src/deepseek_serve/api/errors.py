"""The one place where exceptions become OpenAI error bodies: `{"error": {message, type, param, code}}`.

Other layers raise `ApiError` (or a subclass) with the status they mean; engine errors, request
validation, HTTP routing errors and anything unexpected are mapped here. No stack trace ever
reaches a client: unexpected exceptions are logged with the request id and answered with a
generic 500.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from deepseek_serve.engine.errors import (
    ContextLengthError,
    DeadlineExceededError,
    EngineError,
    EngineStoppedError,
    InvalidRequestError,
    QueueFullError,
)

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with its HTTP status and OpenAI body fields. Raise it from any layer."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class AuthError(ApiError):
    """401: missing, malformed, unknown or revoked API key."""

    def __init__(self, message: str = "Incorrect API key provided.", code: str | None = "invalid_api_key") -> None:
        super().__init__(401, message, "authentication_error", None, code, {"WWW-Authenticate": "Bearer"})


class PermissionDeniedError(ApiError):
    """403: the key is valid but lacks the scope the route needs."""

    def __init__(self, message: str, code: str | None = "insufficient_scope") -> None:
        super().__init__(403, message, "permission_error", None, code)


class NotFoundError(ApiError):
    def __init__(self, message: str, param: str | None = None, code: str | None = "not_found") -> None:
        super().__init__(404, message, "invalid_request_error", param, code)


class RateLimitError(ApiError):
    """429 with `Retry-After` (whole seconds, at least 1) and any x-ratelimit-* headers."""

    def __init__(
        self,
        message: str,
        retry_after_s: float | None = None,
        code: str | None = "rate_limit_exceeded",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        merged = dict(headers or {})
        merged["Retry-After"] = str(max(1, math.ceil(retry_after_s or 1.0)))
        super().__init__(
            429, message, "rate_limit_error" if code != "queue_full" else "server_overloaded", None, code, merged
        )


class ServiceUnavailableError(ApiError):
    def __init__(
        self, message: str, code: str | None = "service_unavailable", retry_after_s: float | None = None
    ) -> None:
        headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))} if retry_after_s else None
        super().__init__(503, message, "service_unavailable", None, code, headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(err: ApiError, extra_headers: Mapping[str, str] | None = None) -> Response:
    headers = {**err.headers, **(extra_headers or {})}
    return Response(orjson.dumps(err.body()), status_code=err.status, headers=headers, media_type="application/json")


def from_engine_error(exc: EngineError) -> ApiError:
    """Map a typed engine error to its API error (status, type, param, code)."""
    if isinstance(exc, ContextLengthError):
        return ApiError(400, str(exc), "invalid_request_error", exc.param, "context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return ApiError(400, str(exc), "invalid_request_error", exc.param, "invalid_value")
    if isinstance(exc, QueueFullError):
        return RateLimitError(str(exc), exc.retry_after_s, code="queue_full")
    if isinstance(exc, DeadlineExceededError):
        return ApiError(504, str(exc) or "The request timed out.", "timeout_error", None, "timeout")
    if isinstance(exc, EngineStoppedError):
        return ServiceUnavailableError(str(exc), code="engine_unavailable", retry_after_s=5.0)
    return ApiError(
        500, "The server had an error while processing your request.", "server_error", None, "internal_error"
    )


def _param_path(loc: Sequence[int | str]) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif "[" in p or "function-" in p or p in ("str", "list[str]", "list[int]", "list[list[int]]"):
            # union-member labels pydantic adds to the location; not part of the field path
            continue
        else:
            out += f".{p}" if out else p
    return out or None


def from_validation_error(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    if not errors:
        return ApiError(400, "Invalid request body.", "invalid_request_error")
    first = errors[0]
    if str(first.get("type", "")).endswith("_type"):
        # a union reports every member's error: a failed check on the member that matched the shape
        # (e.g. a text part's `text` inside `content`) says more than "Input should be a valid string"
        first = next((e for e in errors if e.get("type") == "value_error"), first)
    if first.get("type") == "json_invalid":
        return ApiError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means "
            "you aren't using your HTTP library correctly. The API expects a JSON payload.)",
            "invalid_request_error",
            None,
            "invalid_json",
        )
    loc = tuple(first.get("loc", ()))
    param = _param_path(loc)
    if loc == ("body",) or param is None:
        if first.get("type") == "missing":
            return ApiError(
                400,
                "The request body is missing. The API expects a JSON object.",
                "invalid_request_error",
                None,
                "invalid_json",
            )
        return ApiError(400, f"Invalid request body: {first.get('msg')}", "invalid_request_error", None, "invalid_type")
    if first.get("type") == "missing":
        return ApiError(
            400, f"Missing required parameter: '{param}'.", "invalid_request_error", param, "missing_required_parameter"
        )
    msg = str(first.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return ApiError(400, f"Invalid value for '{param}': {msg}", "invalid_request_error", param, "invalid_value")


_HTTP_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


async def unexpected_error(request: Request, exc: Exception) -> Response:
    """The generic 500 for an exception no handler knows; the traceback goes to the log only."""
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(
        ApiError(
            500,
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
            "internal_error",
        )
    )


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on `app`. Every error response goes through `error_response`."""

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def engine_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, EngineError)
        err = from_engine_error(exc)
        if err.status >= 500:
            logger.error("engine error: %s", exc)
        return error_response(err)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(from_validation_error(exc))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        carried = getattr(exc, "api_error", None)  # api/body.py: a refusal raised while parsing the body
        if isinstance(carried, ApiError):
            return error_response(carried)
        status = exc.status_code
        if status == 404:
            err = ApiError(
                404,
                f"Unknown request URL: {request.method} {request.url.path}. Please check the URL for typos.",
                "invalid_request_error",
                None,
                "unknown_url",
            )
        elif status == 405:
            err = ApiError(
                405,
                f"Method {request.method} is not allowed for {request.url.path}.",
                "invalid_request_error",
                None,
                "method_not_allowed",
                dict(exc.headers or {}),
            )
        elif status == 413:
            err = ApiError(
                413, str(exc.detail), "invalid_request_error", None, "request_too_large", {"Connection": "close"}
            )
        else:
            err = ApiError(
                status,
                str(exc.detail),
                _HTTP_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
                None,
                None,
                dict(exc.headers or {}),
            )
        return error_response(err)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(EngineError, engine_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    # NOTE: Starlette hands this one to its outermost ServerErrorMiddleware, outside our middleware; the
    # app's innermost `UnhandledErrorMiddleware` answers first, so a 500 keeps its request id and CORS.
    app.add_exception_handler(Exception, unexpected_error)
