"""Every failure as an HTTP answer: status, OpenAI error body `{"error": {message, type, param, code}}`
and headers (Retry-After included).

Any layer raises `ApiError` (or a subclass) with the status it means; everything else is mapped here:
engine errors (`from_engine_error`), a generation that ended badly (`from_finish_reason`), request
validation (`from_validation_errors`), HTTP-level refusals (`from_http_status`, `body_too_large`, the
transport's `request_timeout`, `headers_too_large`, `invalid_http_request`) and the unexpected
(`internal_error`).
The HTTP layer (api/error_handlers.py, the middleware) only writes these answers out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from deepseek_serve.engine.errors import (
    ContextLengthError,
    DeadlineExceededError,
    EngineError,
    EngineStoppedError,
    InvalidRequestError,
    QueueFullError,
)

if TYPE_CHECKING:
    from deepseek_serve.contracts import RateLimitDecision

# Retry-After of a 503 whose cause passes on its own (engine stopping or restarting, key store unreachable)
UNAVAILABLE_RETRY_AFTER_S = 5.0


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

    @classmethod
    def refused(cls, decision: RateLimitDecision) -> RateLimitError:
        """The 429 for a request the rate limiter refused: its retry time and x-ratelimit-* headers."""
        return cls(
            "Rate limit reached for requests or tokens. Retry after the indicated time.",
            decision.retry_after_s,
            headers=decision.headers(),
        )


class ServiceUnavailableError(ApiError):
    def __init__(
        self, message: str, code: str | None = "service_unavailable", retry_after_s: float | None = None
    ) -> None:
        headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))} if retry_after_s else None
        super().__init__(503, message, "service_unavailable", None, code, headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid_value(param: str, why: str) -> ApiError:
    """400 for a field whose value the server cannot take."""
    return ApiError(400, f"Invalid value for '{param}': {why}", "invalid_request_error", param, "invalid_value")


def internal_error() -> ApiError:
    """The generic 500 for an exception nothing else maps; the traceback goes to the log only."""
    return ApiError(
        500,
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
        "internal_error",
    )


# --- the engine ---------------------------------------------------------------------------------------
def from_engine_error(exc: EngineError) -> ApiError:
    """Map a typed engine error to its API error (status, type, param, code, Retry-After)."""
    if isinstance(exc, ContextLengthError):
        return ApiError(400, str(exc), "invalid_request_error", exc.param, "context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return ApiError(400, str(exc), "invalid_request_error", exc.param, "invalid_value")
    if isinstance(exc, QueueFullError):
        return RateLimitError(str(exc), exc.retry_after_s, code="queue_full")
    if isinstance(exc, DeadlineExceededError):
        return ApiError(504, str(exc) or "The request timed out.", "timeout_error", None, "timeout")
    if isinstance(exc, EngineStoppedError):
        return ServiceUnavailableError(str(exc), code="engine_unavailable", retry_after_s=UNAVAILABLE_RETRY_AFTER_S)
    return ApiError(
        500, "The server had an error while processing your request.", "server_error", None, "internal_error"
    )


FAILED_FINISH_REASONS = ("timeout", "error", "abort")


def from_finish_reason(finish_reason: str | None, timeout_s: float) -> ApiError | None:
    """The error of a generation that ended with `finish_reason`; None when it ended well.

    timeout -> 504 (the request's deadline, `timeout_s`), abort -> 503 (the server is shutting
    down), error -> 500. A stream sends the body as its last event; a JSON answer raises it."""
    if finish_reason == "timeout":
        return from_engine_error(DeadlineExceededError(f"The request timed out after {timeout_s:g}s and was aborted."))
    if finish_reason == "abort":
        return ServiceUnavailableError(
            "The request was aborted because the server is shutting down.",
            code="engine_unavailable",
            retry_after_s=UNAVAILABLE_RETRY_AFTER_S,
        )
    if finish_reason == "error":
        return ApiError(
            500, "The server had an error while generating the response.", "server_error", None, "internal_error"
        )
    return None


# --- request validation -----------------------------------------------------------------------------
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


def from_validation_errors(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    """A 400 naming the first field that failed validation (pydantic's `errors()` list)."""
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


# --- HTTP ---------------------------------------------------------------------------------------------
_HTTP_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def body_too_large(limit: int) -> ApiError:
    """413 for a body over `limit` bytes; the connection closes (the rest of the body is not read)."""
    return ApiError(
        413,
        f"Request body too large: the limit is {limit} bytes.",
        "invalid_request_error",
        None,
        "request_too_large",
        {"Connection": "close"},
    )


def headers_too_large(limit: int) -> ApiError:
    """431 for a request line and headers over `limit` bytes (answered by the transport, then closed)."""
    return ApiError(
        431,
        f"Request headers too large: the limit is {limit} bytes for the request line and headers together.",
        "invalid_request_error",
        None,
        "request_header_fields_too_large",
    )


def invalid_http_request() -> ApiError:
    """400 for bytes the HTTP parser refuses (answered by the transport, then closed)."""
    return ApiError(400, "Invalid HTTP request received.", "invalid_request_error", None, "invalid_http_request")


def request_timeout(message: str) -> ApiError:
    """408 for headers or a body that did not arrive in time (answered by the transport, then closed)."""
    return ApiError(408, message, "invalid_request_error", None, "request_timeout")


def from_http_status(
    status: int, detail: str, method: str, path: str, headers: Mapping[str, str] | None = None
) -> ApiError:
    """An HTTP error raised by routing or body parsing (unknown URL, wrong method, ...)."""
    if status == 404:
        return ApiError(
            404,
            f"Unknown request URL: {method} {path}. Please check the URL for typos.",
            "invalid_request_error",
            None,
            "unknown_url",
        )
    if status == 405:
        return ApiError(
            405,
            f"Method {method} is not allowed for {path}.",
            "invalid_request_error",
            None,
            "method_not_allowed",
            headers,
        )
    if status == 413:
        return ApiError(413, detail, "invalid_request_error", None, "request_too_large", {"Connection": "close"})
    return ApiError(
        status,
        detail,
        _HTTP_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
        None,
        None,
        headers,
    )
