"""In-process API tests: the real engine (SmolLM2) behind `create_app`, driven through httpx.ASGITransport."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest
import pytest_asyncio

from deepseek_serve.api.app import create_app
from deepseek_serve.engine.async_engine import AsyncEngine
from deepseek_serve.serving.reasoning import ReasoningSplitter, prepare_messages, split_reasoning
from deepseek_serve.serving.schemas import ChatMessage
from tests.support.api import asgi_client, model_id
from tests.support.settings import make_settings


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def client(engine: AsyncEngine, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(tmp_path_factory.mktemp("api"), max_body_bytes=4096, redis_url="", response_cache=False)
    app = create_app(settings, engine=engine)
    async with asgi_client(app, raise_app_exceptions=False) as c:
        yield c


def _assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not None:
        assert err["param"] == param
    assert "Traceback" not in resp.text
    return err


# --- reasoning splitter units -----------------------------------------------------------------------
@pytest.mark.parametrize("cut", range(1, 12))
def test_splitter_any_cut(cut: int) -> None:
    text = "<think>\nstep one</think>\n\nThe answer."
    s = ReasoningSplitter()
    parts = [s.push(text[i : i + cut]) for i in range(0, len(text), cut)]
    parts.append(s.flush())
    assert "".join(p.reasoning for p in parts) == "step one"
    assert "".join(p.content for p in parts) == "The answer."


def test_splitter_prefilled_and_plain() -> None:
    assert split_reasoning("thinking</think>answer", prefilled=True) == ("thinking", "answer")
    assert split_reasoning("no tags <think> here") == ("", "no tags <think> here")
    assert split_reasoning("<thi") == ("", "<thi")  # held back, then released as content
    assert split_reasoning("<think>unfinished </thi") == ("unfinished </thi", "")


def test_reasoning_dropped_from_history() -> None:
    msgs = [
        ChatMessage(role="user", content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]),
        ChatMessage(role="assistant", content="<think>x</think>ok", reasoning_content="secret"),
    ]
    out = prepare_messages(msgs)
    assert out == [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "ok"}]


# --- endpoints --------------------------------------------------------------------------------------
async def test_health_and_models(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health/live")).status_code == 200
    ready = await client.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert (await client.get("/health")).status_code == 200
    model = await model_id(client)
    assert (await client.get(f"/v1/models/{model}")).json()["id"] == model
    _assert_error(await client.get("/v1/models/nope"), 404)


async def test_chat_json(client: httpx.AsyncClient) -> None:
    model = await model_id(client)
    resp = await client.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": "Say hi"}],
            "max_tokens": 5,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 2,
            "some_future_field": 1,
        },
        headers={"X-Request-ID": "abc-123"},
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-request-id"] == "abc-123"
    body = resp.json()
    choice = body["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["completion_tokens"] == len(choice["logprobs"]["content"]) <= 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_cache_hit_tokens"] + usage["prompt_cache_miss_tokens"] == usage["prompt_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_cache_hit_tokens"]
    assert len(choice["logprobs"]["content"][0]["top_logprobs"]) == 2


async def test_sse_framing(client: httpx.AsyncClient) -> None:
    model = await model_id(client)
    async with client.stream(
        "POST",
        "/v1/completions",
        json={
            "model": model,
            "prompt": "Once upon",
            "max_tokens": 4,
            "temperature": 0,
            "n": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = b"".join([chunk async for chunk in resp.aiter_bytes()])
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    datas = [orjson.loads(e[len(b"data: ") :]) for e in events[:-1] if e.startswith(b"data: ")]
    usage = datas[-1]["usage"]
    assert datas[-1]["choices"] == []
    finishes = {c["index"]: c["finish_reason"] for d in datas for c in d["choices"] if c["finish_reason"]}
    assert finishes == {0: "length", 1: "length"}
    assert usage["completion_tokens"] == 8


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": []}, "messages"),
        ({}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, "max_tokens"),
    ],
)
async def test_invalid_fields_400(client: httpx.AsyncClient, payload: dict, param: str) -> None:
    payload = {"model": await model_id(client), **payload}
    _assert_error(await client.post("/v1/chat/completions", json=payload), 400, param)


async def test_transport_errors(client: httpx.AsyncClient) -> None:
    model = await model_id(client)
    _assert_error(
        await client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}),
        400,
    )
    _assert_error(
        await client.post(
            "/v1/chat/completions", json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}
        ),
        404,
        "model",
    )
    _assert_error(
        await client.post(
            "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "x" * 5000}]}
        ),
        413,
    )
    _assert_error(await client.get("/v1/nowhere"), 404)
    _assert_error(await client.get("/v1/chat/completions"), 405)


async def test_context_length_400(client: httpx.AsyncClient) -> None:
    model = await model_id(client)
    err = _assert_error(
        await client.post("/v1/completions", json={"model": model, "prompt": [1] * 100, "max_tokens": 100_000}), 400
    )
    assert err["code"] == "context_length_exceeded" and "100100" in err["message"]


async def test_deadline_504_and_stream_error_event(engine: AsyncEngine, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, request_timeout_s=0.3, response_cache=False)
    app = create_app(settings, engine=engine)
    payload = {"model": engine.model_info.id, "prompt": "Hello", "max_tokens": 2000, "ignore_eos": True}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            err = _assert_error(await c.post("/v1/completions", json=payload), 504)
            assert err["code"] == "timeout"
            resp = await c.post("/v1/completions", json={**payload, "stream": True})
            assert resp.status_code == 200
            events = [e for e in resp.content.split(b"\n\n") if e.startswith(b"data: {")]
            assert orjson.loads(events[-1][6:])["error"]["code"] == "timeout"
    assert engine.stats().num_running == 0
