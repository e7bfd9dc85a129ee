"""A small HTTP/1.1 client for the gateway's upstream calls: keep-alive connections per upstream,
responses parsed by httptools (C, the parser Uvicorn uses), bodies streamed as they arrive.

Why not httpx: on the gateway's hot path (one streamed completion per request, one chunk per token)
httpx's layers (httpx -> httpcore -> h11 -> anyio) cost about 2 ms of CPU per streamed request on
the shared 2-vCPU test host, this client about 0.4 ms (bench/gateway_overhead.py reports the
gateway's CPU per request and per token).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

_READ = 65536


class HttpError(Exception):
    """The upstream could not be reached or broke off."""


class ConnectFailed(HttpError):
    """No connection (refused, unreachable, connect timeout): the upstream is down."""


class ConnectionLost(HttpError):
    """The connection closed or broke before the response ended. `reused`: it was a pooled
    keep-alive connection and no response byte had arrived (the request never reached the server's
    application, so sending it again on a fresh connection is safe)."""

    def __init__(self, message: str, *, reused: bool = False) -> None:
        super().__init__(message)
        self.reused = reused


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0
        self.used = False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class _Exchange:
    """httptools callbacks for one response."""

    def __init__(self) -> None:
        self.parser: httptools.HttpResponseParser | None = None
        self.headers: dict[str, str] = {}
        self.headers_done = False
        self.keep_alive = False
        self.chunks: deque[bytes] = deque()
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.headers_done = True
        # asked now: once the message is complete, llhttp has reset the flags this answer reads
        # (framing, Connection), and should_keep_alive() then says False for every response.
        assert self.parser is not None
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(bytes(body))

    def on_message_complete(self) -> None:
        self.complete = True


class Response:
    """Status and headers are read; the body is read by `aiter_raw` / `read`. Always `aclose()`."""

    def __init__(self, client: Client, conn: _Conn, parser: httptools.HttpResponseParser, ex: _Exchange) -> None:
        self._client = client
        self._conn: _Conn | None = conn
        self._parser = parser
        self._ex = ex
        self.status_code = parser.get_status_code()
        self.headers = ex.headers

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        ex = self._ex
        while True:
            while ex.chunks:
                yield ex.chunks.popleft()
            if ex.complete or self._conn is None:
                return
            try:
                data = await self._conn.reader.read(_READ)
                if not data:
                    raise ConnectionLost("the upstream closed the connection mid-response")
                self._parser.feed_data(data)
            except (OSError, httptools.HttpParserError) as exc:
                self._drop()
                raise ConnectionLost(f"response broke off ({type(exc).__name__}: {exc})") from None
            except ConnectionLost:
                self._drop()
                raise

    async def read(self, limit: int) -> bytes:
        """The body, or its first `limit` bytes (then the connection is not reused)."""
        data = bytearray()
        async for part in self.aiter_raw():
            data += part
            if len(data) > limit:
                break
        return bytes(data[:limit])

    async def aclose(self) -> None:
        """Return the connection to the pool when the response ended cleanly, else close it."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._ex.complete and not self._ex.chunks and self._ex.keep_alive:
            self._client._release(conn)
        else:
            conn.close()

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class Client:
    """Keep-alive HTTP/1.1 connections to one base URL (http or https). Idle connections live at
    most `keepalive_s` (below the servers' own keep-alive: Uvicorn's default is 5 s)."""

    def __init__(
        self, base_url: str, *, connect_timeout_s: float, keepalive_s: float = 4.0, max_idle: int = 256
    ) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or ""
        self.https = parts.scheme == "https"
        self.port = parts.port or (443 if self.https else 80)
        self.prefix = parts.path.rstrip("/")
        self._host_header = parts.netloc.encode("idna")
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self.max_idle = max_idle
        self._idle: list[_Conn] = []
        self._ssl = ssl.create_default_context() if self.https else None
        self._closed = False

    async def request(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> Response:
        """Send one request and read the response head. Raises ConnectFailed or ConnectionLost."""
        head = [
            f"{method} {self.prefix}{path} HTTP/1.1".encode(),
            b"Host: " + self._host_header,
            b"Content-Length: " + str(len(body)).encode(),
        ]
        head += [f"{k}: {v}".encode("latin-1") for k, v in (headers or {}).items()]
        message = b"\r\n".join(head) + b"\r\n\r\n" + body
        conn = self._take_idle()
        reused = conn is not None
        if conn is None:
            conn = await self._connect()
        ex = _Exchange()
        parser = ex.parser = httptools.HttpResponseParser(ex)
        got_bytes = False
        try:
            conn.writer.write(message)
            while not ex.headers_done:
                data = await conn.reader.read(_READ)
                if not data:
                    raise ConnectionLost(
                        "the upstream closed the connection before answering", reused=reused and not got_bytes
                    )
                got_bytes = True
                parser.feed_data(data)
        except ConnectionLost:
            conn.close()
            raise
        except (OSError, httptools.HttpParserError) as exc:
            conn.close()
            raise ConnectionLost(
                f"request failed ({type(exc).__name__}: {exc})", reused=reused and not got_bytes
            ) from None
        except BaseException:
            conn.close()
            raise
        return Response(self, conn, parser, ex)

    async def get(self, path: str, *, headers: dict[str, str] | None = None, limit: int) -> tuple[int, bytes]:
        response = await self.request("GET", path, headers=headers)
        try:
            return response.status_code, await response.read(limit)
        finally:
            await response.aclose()

    async def _connect(self) -> _Conn:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    self.host, self.port, ssl=self._ssl, server_hostname=self.host if self.https else None
                ),
                self.connect_timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port} ({type(exc).__name__}: {exc})") from None
        return _Conn(reader, writer)

    def _take_idle(self) -> _Conn | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since < self.keepalive_s and not conn.reader.at_eof() and not conn.writer.is_closing():
                return conn
            conn.close()
        return None

    def _release(self, conn: _Conn) -> None:
        if self._closed or len(self._idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    async def aclose(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()
