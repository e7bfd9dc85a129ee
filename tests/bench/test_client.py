"""The load generator's request path against a raw local HTTP server that drops a kept-alive connection
the way llama.cpp's llama-server does."""

from __future__ import annotations

import asyncio
import json

import httpx

from deepseek_serve.bench.client import STATUS_CONNECT, ClientOptions, send
from deepseek_serve.bench.workloads import Workload

CHUNK = {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "length"}]}
SSE = f"data: {json.dumps(CHUNK)}\n\ndata: [DONE]\n\n".encode()
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: "
    + str(len(SSE)).encode()
    + b"\r\n\r\n"
    + SSE
)


async def _read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    await reader.readexactly(length)


async def _serve(drop_requests: set[int]) -> tuple[asyncio.Server, list[int]]:
    """Answers every request on a kept-alive connection, except the n-th ones in `drop_requests`, where it
    closes the connection after reading the request, without a response."""
    seen: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await _read_request(reader)
                seen.append(len(seen) + 1)
                if len(seen) in drop_requests:
                    break
                writer.write(RESPONSE)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0), seen


async def test_a_request_on_a_connection_the_server_dropped_is_sent_again() -> None:
    server, seen = await _serve({2})
    port = server.sockets[0].getsockname()[1]
    spec = Workload("short", max_tokens=1).request(0)
    options = ClientOptions(model="m")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            first = await send(client, spec, options, sent_at=0.0)
            second = await send(client, spec, options, sent_at=0.0)  # the server drops it: sent once more
            assert first.ok and second.ok, (first.error, second.error)
            assert len(seen) == 3
    finally:
        server.close()
        await server.wait_closed()


async def test_a_second_drop_is_reported_not_retried_forever() -> None:
    server, seen = await _serve({1, 2})
    port = server.sockets[0].getsockname()[1]
    spec = Workload("short", max_tokens=1).request(0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            result = await send(client, spec, ClientOptions(model="m"), sent_at=0.0)
        assert not result.ok and result.status == STATUS_CONNECT
        assert len(seen) == 2
    finally:
        server.close()
        await server.wait_closed()
