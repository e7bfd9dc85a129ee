"""Pure ASGI middleware (BaseHTTPMiddleware would buffer and break streaming).

- `RequestIdMiddleware`: accepts `X-Request-ID` (or makes one), returns it on the response and
  sets `request_id_var` so every log line of the request carries it (`install_log_record_factory`).
- `BodySizeLimitMiddleware`: refuses bodies over `max_body_bytes` with 413, by `Content-Length`
  up front or by counting streamed chunks.
- `UnhandledErrorMiddleware` (innermost): answers an exception no handler knows with the generic 500
  while the request id and CORS are still around it (Starlette's own catch-all is outside them all).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import uuid
from typing import Any

import orjson
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepseek_serve.api.error_handlers import unexpected_error
from deepseek_serve.serving.failures import ApiError, body_too_large

_log = logging.getLogger("deepseek_serve.api")
# Uvicorn's message when it cancels the requests still running at the end of its graceful shutdown
_SHUTDOWN_CANCEL = "timeout graceful shutdown exceeded"

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_VALID_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def current_request_id() -> str | None:
    return request_id_var.get()


def install_log_record_factory() -> None:
    """Give every `LogRecord` a `request_id` attribute ("-" outside a request). Idempotent."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_deepseek_request_id", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.request_id = request_id_var.get() or "-"
        return record

    factory._deepseek_request_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        # a client id that is not a short token is replaced, so it cannot inject log lines.
        request_id = incoming if incoming and _VALID_ID.match(incoming) else f"req-{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        raw_id = request_id.encode("latin-1")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", raw_id))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` once the streamed body passes the limit; FastAPI re-raises HTTP errors
    from body parsing, so the error handlers answer the 413 it carries."""

    def __init__(self, limit: int) -> None:
        self.api_error = body_too_large(limit)
        super().__init__(413, self.api_error.message)


class _StartTracker:
    """Wraps an ASGI `send`; `started` turns true once the response has begun (after which an error
    can no longer be answered with a response of its own)."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


async def send_error(send: Send, err: ApiError) -> None:
    """Write `err` as a whole response on a raw ASGI `send` (where no Response object is at hand)."""
    body = orjson.dumps(err.body())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers.extend((name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in err.headers.items())
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def _reject(self, send: Send) -> None:
        await send_error(send, body_too_large(self.max_body_bytes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_body_bytes:
                    await self._reject(send)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        tracked = _StartTracker(send)
        try:
            await self.app(scope, limited_receive, tracked)
        except BodyTooLarge:
            if not tracked.started:
                await self._reject(send)


class UnhandledErrorMiddleware:
    """An exception that escaped every handler becomes the generic 500 here, inside the request-id and
    CORS middleware, so the log line carries the request id and the response its `x-request-id` and CORS
    headers. HTTP errors pass on (the body-size middleware answers its own); once the response has
    started nothing can be sent, so the exception goes on up."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracked = _StartTracker(send)
        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError as exc:
            # when the graceful-shutdown wait (DS_DRAIN_TIMEOUT_S) runs out, Uvicorn cancels the
            # requests still running and would log each as "Exception in ASGI application" with a
            # traceback at ERROR. The cut stream has been accounted already; one warning says why it ended.
            if _SHUTDOWN_CANCEL not in str(exc):
                raise
            _log.warning("request cut: the drain timeout ended it during shutdown")
        except StarletteHTTPException:
            raise
        except Exception as exc:
            if tracked.started:
                raise
            response = await unexpected_error(Request(scope), exc)
            await response(scope, receive, send)
