"""`GuardedHttpToolsProtocol`: Uvicorn's httptools protocol with deadlines and a header size limit.

Uvicorn closes a connection only when it stays silent for `timeout_keep_alive` after a response;
any byte re-arms nothing, so half-sent headers, a trickled body or a trickle of blank lines keep a
connection open forever, and a request head may be any size. Nothing in ASGI runs before the
headers are complete, so this lives in the protocol. A connection is always in one phase, and each
phase has its clock:

| phase | from -> to | limit | when exceeded |
|---|---|---|---|
| idle | connection opened / response sent -> first byte of a request | `keepalive_timeout_s` | closed silently |
| head | first byte -> end of the headers | `header_timeout_s`, `max_header_bytes` | 408 / 431, closed |
| body | end of the headers -> last body byte | `body_timeout_s` | 408 if no response began, closed |

After the body the request belongs to the app (the engine's `DS_REQUEST_TIMEOUT_S`). Whatever the
phase, a response the client stops reading (the transport's write buffer stays full) is dropped
after `send_timeout_s`: the app's pending send returns, it sees a disconnect and aborts its work. The 408 and
431 bodies are OpenAI's error shape; they are written straight to the socket, since no ASGI app
has seen the request (or, for the body, it is still waiting for it: its `receive` then reports a
disconnect and its response goes nowhere).

`cli/serve.py` passes `protocol_factory(settings)` to Uvicorn as its `http` protocol.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from deepseek_serve.config import Settings
from deepseek_serve.serving.failures import ApiError, headers_too_large, invalid_http_request, request_timeout

logger = logging.getLogger("deepseek_serve.api")

Phase = Literal["idle", "head", "body", "app"]


@dataclass(frozen=True)
class TransportLimits:
    keepalive_timeout_s: float
    header_timeout_s: float
    body_timeout_s: float
    max_header_bytes: int
    send_timeout_s: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings) -> TransportLimits:
        return cls(
            keepalive_timeout_s=settings.http_keepalive_timeout_s,
            header_timeout_s=settings.http_header_timeout_s,
            body_timeout_s=settings.http_body_timeout_s,
            max_header_bytes=settings.http_max_header_bytes,
            send_timeout_s=settings.http_send_timeout_s,
        )


class _Refusal(Exception):
    """Raised from a parser callback: stop parsing, answer `error`, close. (`data_received` replaces
    Uvicorn's, which would answer any callback error with its plain-text 400.)"""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error
        self.message = error.message


def _header_too_large(limit: int) -> _Refusal:
    return _Refusal(headers_too_large(limit))


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, limits: TransportLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.timeout_keep_alive = limits.keepalive_timeout_s  # type: ignore[assignment]
        self._phase: Phase = "idle"
        self._head_bytes = 0  # bytes received while the head is incomplete (bounds httptools' buffer)
        self._head_exact = 0  # request line + headers as parsed
        self._deadline: asyncio.TimerHandle | None = None
        self._send_deadline: asyncio.TimerHandle | None = None

    # --- clocks -----------------------------------------------------------------------------------
    def _arm(self, seconds: float, on_expiry: Callable[[], None]) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, on_expiry)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_timed_out(self) -> None:
        self._deadline = None
        self._refuse(
            _Refusal(request_timeout(f"Request headers not received within {self.limits.header_timeout_s:g} s."))
        )

    def _body_timed_out(self) -> None:
        self._deadline = None
        self._refuse(
            _Refusal(
                request_timeout(f"Request body not received within {self.limits.body_timeout_s:g} s of the headers.")
            )
        )

    # --- the connection ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # idle before the first request, as between two
        self.timeout_keep_alive_task = self.loop.call_later(
            self.limits.keepalive_timeout_s, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._end_send_deadline()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_deadline is None:
            self._send_deadline = self.loop.call_later(self.limits.send_timeout_s, self._send_timed_out)

    def resume_writing(self) -> None:
        self._end_send_deadline()
        super().resume_writing()

    def _end_send_deadline(self) -> None:
        if self._send_deadline is not None:
            self._send_deadline.cancel()
            self._send_deadline = None

    def _send_timed_out(self) -> None:
        self._send_deadline = None
        if not self.flow.write_paused:
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown"
        logger.warning(
            "connection from %s dropped: the client read nothing for %g s", client, self.limits.send_timeout_s
        )
        # abort, not close: close() would wait for the full buffer to drain first.
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._phase in ("idle", "app"):
            self._start_head()
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            # httptools re-raises a callback's exception as HttpParserCallbackError, the original as context
            cause = exc.__context__
            self._refuse(cause if isinstance(cause, _Refusal) else _Refusal(invalid_http_request()))
            return
        if self._phase == "head":
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse(_header_too_large(self.limits.max_header_bytes))

    def _start_head(self) -> None:
        self._phase = "head"
        self._head_bytes = 0
        self._head_exact = 0
        self._arm(self.limits.header_timeout_s, self._head_timed_out)

    # --- parser callbacks -------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._phase != "head":  # pipelined: the previous message ended inside this chunk
            self._start_head()
        self._head_exact = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url) + 16)  # + method, version and line break, roughly
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_head(self, n: int) -> None:
        self._head_exact += n
        if self._head_exact > self.limits.max_header_bytes:
            raise _header_too_large(self.limits.max_header_bytes)

    def on_headers_complete(self) -> None:
        self._phase = "body"
        self._arm(self.limits.body_timeout_s, self._body_timed_out)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self._phase = "app"
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._phase == "app":
            self._phase = "idle"  # Uvicorn armed its keep-alive clock (unless a pipelined request runs)

    # --- refusing ---------------------------------------------------------------------------------
    def _refuse(self, refusal: _Refusal) -> None:
        """Answer `refusal` where no response is under way on this connection, then close it."""
        self._disarm()
        if self.transport is None or self.transport.is_closing():
            return
        cycle = self.cycle
        if self._phase == "body" and cycle is not None:
            can_answer = not cycle.response_started
            # the app waiting for this body sees a disconnect; anything it sends is dropped
            cycle.disconnected = True
            cycle.message_event.set()
        else:
            can_answer = cycle is None or cycle.response_complete
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown"
        logger.warning("connection from %s closed: %s", client, refusal.message)
        if can_answer:
            body = orjson.dumps(refusal.error.body())
            self.transport.write(
                b"".join(
                    [
                        STATUS_LINE[refusal.error.status],
                        b"content-type: application/json\r\n",
                        b"content-length: ",
                        str(len(body)).encode(),
                        b"\r\n",
                        b"connection: close\r\n\r\n",
                        body,
                    ]
                )
            )
        self.transport.close()


def protocol_factory(settings: Settings) -> Callable[..., GuardedHttpToolsProtocol]:
    """What `uvicorn.run(http=...)` takes: builds the protocol with the settings' limits. A partial of a
    module-level class, so it pickles into `--workers` processes."""
    return functools.partial(GuardedHttpToolsProtocol, limits=TransportLimits.from_settings(settings))
