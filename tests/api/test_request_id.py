"""Request id: `X-Request-ID` is accepted (or one is made), returned on every response, and put on every
log line of its request. In process (the session engine behind `create_app`) and in a real server
process with JSON logs."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
import pytest_asyncio

from deepseek_serve.api.app import create_app
from deepseek_serve.engine.async_engine import AsyncEngine
from tests.support.api import asgi_client, model_id
from tests.support.server import ServeProcess
from tests.support.settings import make_settings

GENERATED = re.compile(r"^req-[0-9a-f]{32}$")
_FINISHED = "deepseek_serve.serving.accounting"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def client(engine: AsyncEngine, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(tmp_path_factory.mktemp("rid"), max_body_bytes=4096, redis_url="", response_cache=False)
    app = create_app(settings, engine=engine)

    async def boom() -> None:
        raise RuntimeError("a bug in a route")

    app.add_api_route("/test/boom", boom)  # an unexpected exception, as a real bug would raise
    async with asgi_client(app, raise_app_exceptions=False) as c:
        yield c


def _chat(model: str, text: str = "Say hi", **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 3, "temperature": 0, **extra}


async def test_given_id_is_returned_on_every_kind_of_response(client: httpx.AsyncClient) -> None:
    model = await model_id(client)
    requests = [
        ("GET", "/health/live", None, None),
        ("GET", "/v1/models/nope", None, None),  # 404 from a route
        ("GET", "/no/such/path", None, None),  # 404 from the router
        ("DELETE", "/v1/chat/completions", None, None),  # 405
        ("POST", "/v1/chat/completions", None, {"model": model, "messages": []}),  # 400 validation
        ("POST", "/v1/chat/completions", b"x" * 5000, None),  # 413 by Content-Length
        ("POST", "/v1/chat/completions", None, _chat(model)),  # 200 JSON
    ]
    for i, (method, path, content, body) in enumerate(requests):
        rid = f"given-{i}"
        resp = await client.request(method, path, content=content, json=body, headers={"X-Request-ID": rid})
        assert resp.headers.get("x-request-id") == rid, (method, path, resp.status_code)
    async with client.stream(
        "POST", "/v1/chat/completions", json=_chat(model, stream=True), headers={"X-Request-ID": "given-stream"}
    ) as resp:
        assert resp.headers["x-request-id"] == "given-stream"
        assert (await resp.aread()).rstrip().endswith(b"data: [DONE]")


async def test_missing_or_unusable_id_is_replaced_by_a_generated_one(client: httpx.AsyncClient) -> None:
    seen = set()
    for headers in (
        {},
        {"X-Request-ID": ""},
        {"X-Request-ID": "has spaces"},
        {"X-Request-ID": "x" * 129},
        {"X-Request-ID": "semi;colon"},
    ):
        resp = await client.get("/health/live", headers=headers)
        rid = resp.headers["x-request-id"]
        assert GENERATED.match(rid), (headers, rid)
        seen.add(rid)
    assert len(seen) == 5  # a fresh id each time
    ok = "Abc.123_x:y-z" + "9" * 115  # every allowed character class, 128 long
    assert (await client.get("/health/live", headers={"X-Request-ID": ok})).headers["x-request-id"] == ok


async def test_concurrent_requests_log_their_own_id(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    model = await model_id(client)
    caplog.set_level(logging.INFO, logger="deepseek_serve")

    async def one(i: int) -> tuple[str, str]:
        resp = await client.post(
            "/v1/chat/completions", json=_chat(model, f"Count to {i}"), headers={"X-Request-ID": f"conc-{i}"}
        )
        assert resp.status_code == 200, resp.text
        return f"conc-{i}", resp.json()["id"]

    pairs = await asyncio.gather(*(one(i) for i in range(4)))
    for rid, completion_id in pairs:
        lines = [r for r in caplog.records if r.name == _FINISHED and completion_id in r.getMessage()]
        assert len(lines) == 1
        assert lines[0].request_id == rid  # type: ignore[attr-defined]
    # and nothing of these requests logged without its id
    for record in caplog.records:
        if any(cid in record.getMessage() for _, cid in pairs):
            assert record.request_id in {rid for rid, _ in pairs}  # type: ignore[attr-defined]


async def test_unexpected_error_keeps_the_request_id(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="deepseek_serve")
    resp = await client.get("/test/boom", headers={"X-Request-ID": "boom-1"})
    assert resp.status_code == 500
    err = resp.json()["error"]
    assert err["type"] == "server_error" and "a bug in a route" not in resp.text
    assert resp.headers.get("x-request-id") == "boom-1"
    logged = [r for r in caplog.records if "unhandled error on GET /test/boom" in r.getMessage()]
    assert len(logged) == 1
    assert logged[0].request_id == "boom-1"  # type: ignore[attr-defined]
    assert logged[0].exc_info is not None  # the traceback goes to the log, not to the client


# --- a real server, JSON logs --------------------------------------------------------------------------
@pytest.mark.slow
def test_real_server_logs_every_line_of_a_request_with_its_id(tmp_path: Path) -> None:
    with ServeProcess(
        tmp_path / "srv", DS_LOG_FORMAT="json", DS_LOG_LEVEL="info", DS_REDIS_URL="", DS_RESPONSE_CACHE="false"
    ) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        # 1. chat, JSON, with a given id
        raw = client.chat.completions.with_raw_response.create(
            model=model,
            max_tokens=4,
            temperature=0,
            messages=[{"role": "user", "content": "Hi"}],
            extra_headers={"X-Request-ID": "rid-chat-1"},
        )
        assert raw.headers["x-request-id"] == "rid-chat-1"
        chat_id = raw.parse().id
        # 2. completions, streamed, without an id: one is generated and returned
        with httpx.stream(
            "POST",
            f"{srv.url}/v1/completions",
            timeout=60,
            json={"model": model, "prompt": "One, two,", "max_tokens": 4, "stream": True},
        ) as resp:
            stream_rid = resp.headers["x-request-id"]
            events = [line for line in resp.iter_lines() if line.startswith("data: {")]
        assert GENERATED.match(stream_rid)
        stream_id = json.loads(events[0][len("data: ") :])["id"]
        # 3. an error answered by a route, with a given id
        with pytest.raises(openai.NotFoundError) as info:
            client.models.retrieve("nope", extra_headers={"X-Request-ID": "rid-404"})
        assert info.value.response.headers["x-request-id"] == "rid-404"
        # 4. an unusable id is replaced
        models = httpx.get(f"{srv.url}/v1/models", headers={"X-Request-ID": "not valid!"}, timeout=30)
        models_rid = models.headers["x-request-id"]
        assert GENERATED.match(models_rid)
    # read after the server stopped: every line is flushed
    lines = [json.loads(line) for line in srv.stderr().splitlines() if line.strip()]

    def access(path: str) -> list[dict[str, object]]:
        return [e for e in lines if e["logger"] == "uvicorn.access" and e.get("path") == path]

    # every line that names one of the requests carries that request's id, and only that one
    expected = {"/v1/chat/completions": ("rid-chat-1", chat_id), "/v1/completions": (stream_rid, stream_id)}
    for path, (rid, completion_id) in expected.items():
        assert [e.get("request_id") for e in access(path)] == [rid]
        finished = [e for e in lines if completion_id in str(e["message"])]
        assert len(finished) == 1 and finished[0]["request_id"] == rid
        assert finished[0]["tokens"] > 0
        assert {id(e) for e in lines if e.get("request_id") == rid} == {id(finished[0]), id(access(path)[0])}
    assert [e.get("request_id") for e in access("/v1/models") if e.get("request_id") == models_rid] == [models_rid]
    errors = [e for e in lines if e.get("request_id") == "rid-404"]
    assert [(e["logger"], e["path"], e["status"]) for e in errors] == [("uvicorn.access", "/v1/models/nope", 404)]
    # no request line without an id: every access line (health polls included) has one
    assert all(
        GENERATED.match(str(e.get("request_id", ""))) or str(e.get("request_id", "")).startswith("rid-")
        for e in lines
        if e["logger"] == "uvicorn.access"
    )
