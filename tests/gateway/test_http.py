"""gateway/http.py against a real Uvicorn server in the test's event loop: keep-alive connections are
reused for every kind of response the gateway reads (a small JSON answer, a streamed SSE body), and
not when the server closes them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn

from deepseek_serve.gateway.http import Client
from tests.support.net import free_port

Scope = dict[str, Any]


class App:
    """Records the client port of every request: one port = one connection."""

    def __init__(self) -> None:
        self.ports: list[int] = []

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        self.ports.append(scope["client"][1])
        path = scope["path"]
        if path == "/json":
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": b'{"ok": true}'})
        elif path == "/stream":  # chunked, as an engine's SSE answer
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
            )
            for i in range(3):
                await send({"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        else:  # the server ends the connection after this answer
            await send({"type": "http.response.start", "status": 200, "headers": [(b"connection", b"close")]})
            await send({"type": "http.response.body", "body": b"bye"})


@pytest.fixture
async def server() -> AsyncIterator[tuple[App, str]]:
    app = App()
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    srv = uvicorn.Server(config)
    task = asyncio.create_task(srv.serve())
    while not srv.started:  # noqa: ASYNC110 - uvicorn offers no event for it
        await asyncio.sleep(0.01)
    yield app, f"http://127.0.0.1:{port}"
    srv.should_exit = True
    await task


async def test_connections_are_reused_after_json_and_streamed_answers(server: tuple[App, str]) -> None:
    app, url = server
    client = Client(url, connect_timeout_s=2.0)
    try:
        for _ in range(3):
            status, body = await client.get("/json", limit=1024)
            assert (status, body) == (200, b'{"ok": true}')
            assert len(client._idle) == 1
            response = await client.request("POST", "/stream", body=b"{}")
            streamed = b"".join([part async for part in response.aiter_raw()])
            await response.aclose()
            assert streamed.endswith(b"data: [DONE]\n\n") and len(client._idle) == 1
        assert len(set(app.ports)) == 1, app.ports  # six requests, one connection
    finally:
        await client.aclose()


async def test_a_connection_the_server_closes_is_not_reused(server: tuple[App, str]) -> None:
    app, url = server
    client = Client(url, connect_timeout_s=2.0)
    try:
        assert await client.get("/close", limit=1024) == (200, b"bye")
        assert client._idle == []
        assert await client.get("/json", limit=1024) == (200, b'{"ok": true}')
        assert len(set(app.ports)) == 2
    finally:
        await client.aclose()
