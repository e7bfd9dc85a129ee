"""CORS (in process: the session engine behind `create_app`), and the life of a real `deepseek-serve serve`
process: SIGTERM drains in-flight streams and exits 0, the drain timeout cuts what is left, two workers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from deepseek_serve.api.app import create_app
from deepseek_serve.engine.async_engine import AsyncEngine
from tests.support.api import asgi_client
from tests.support.server import ServeProcess
from tests.support.settings import make_settings

ORIGIN = "https://app.example"
OTHER = "https://evil.example"
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}


@asynccontextmanager
async def app_client(engine: AsyncEngine, data_dir: Path, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(data_dir, redis_url="", response_cache=False, max_body_bytes=4096, **overrides)
    app = create_app(settings, engine=engine)

    async def boom() -> None:
        raise RuntimeError("a bug in a route")

    app.add_api_route("/test/boom", boom)
    async with asgi_client(app, raise_app_exceptions=False) as client:
        yield client


def cors_headers(resp: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in resp.headers.items() if k.startswith("access-control-")}


def _chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}


# --- CORS ---------------------------------------------------------------------------------------------
def test_cors_origins_setting_reads_a_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    assert make_settings().cors_origins == []  # off by default
    monkeypatch.setenv("DS_CORS_ORIGINS", f'["{ORIGIN}", "http://localhost:3000"]')
    assert make_settings().cors_origins == [ORIGIN, "http://localhost:3000"]


async def test_cors_off_by_default(engine: AsyncEngine, tmp_path: Path) -> None:
    async with app_client(engine, tmp_path) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        resp = await client.post("/v1/chat/completions", json=_chat(model), headers={"Origin": ORIGIN})
        assert resp.status_code == 200 and cors_headers(resp) == {}
        # a preflight is just an OPTIONS request the route does not allow: 405, OpenAI's error shape
        pre = await client.options("/v1/chat/completions", headers={"Origin": ORIGIN, **PREFLIGHT})
        assert pre.status_code == 405 and cors_headers(pre) == {}
        assert pre.json()["error"]["code"] == "method_not_allowed"


async def test_cors_configured_origin(engine: AsyncEngine, tmp_path: Path) -> None:
    async with app_client(engine, tmp_path, cors_origins=[ORIGIN]) as client:
        pre = await client.options("/v1/chat/completions", headers={"Origin": ORIGIN, **PREFLIGHT})
        assert pre.status_code == 200
        got = cors_headers(pre)
        assert got["access-control-allow-origin"] == ORIGIN
        assert "POST" in [m.strip() for m in got["access-control-allow-methods"].split(",")]
        # browsers never let a wildcard cover Authorization: it must be named
        assert {h.strip() for h in got["access-control-allow-headers"].split(",")} >= {"authorization", "content-type"}
        assert got["access-control-allow-credentials"] == "true"
        assert "Origin" in pre.headers["vary"]

        bad = await client.options("/v1/chat/completions", headers={"Origin": OTHER, **PREFLIGHT})
        assert "access-control-allow-origin" not in bad.headers
        assert bad.status_code >= 400

        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        ok = await client.post(
            "/v1/chat/completions", json=_chat(model), headers={"Origin": ORIGIN, "Authorization": "Bearer x"}
        )
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
        exposed = {h.strip() for h in ok.headers["access-control-expose-headers"].split(",")}
        assert "x-request-id" in exposed
        # every header the rate limiter sets is readable by the page
        from deepseek_serve.contracts import RateLimitDecision

        full = RateLimitDecision(True, 1, 1, 1.0, 1, 1, 1.0).headers()
        assert set(full) <= exposed and len(full) == 6
        other = await client.post("/v1/chat/completions", json=_chat(model), headers={"Origin": OTHER})
        assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
        no_origin = await client.get("/v1/models")
        assert "access-control-allow-origin" not in no_origin.headers


async def test_cors_headers_on_errors_a_browser_must_read(engine: AsyncEngine, tmp_path: Path) -> None:
    """A browser hides a response without CORS headers from the page: errors need them too."""
    async with app_client(engine, tmp_path, cors_origins=[ORIGIN]) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        errors = [
            await client.post(
                "/v1/chat/completions", json={"model": model, "messages": []}, headers={"Origin": ORIGIN}
            ),  # 400
            await client.get("/v1/models/nope", headers={"Origin": ORIGIN}),  # 404
            await client.post(
                "/v1/chat/completions",
                content=b"x" * 5000,
                headers={"Origin": ORIGIN, "content-type": "application/json"},
            ),  # 413
            await client.get("/test/boom", headers={"Origin": ORIGIN}),  # 500
        ]
        assert [r.status_code for r in errors] == [400, 404, 413, 500]
        for resp in errors:
            assert resp.headers.get("access-control-allow-origin") == ORIGIN, resp.status_code
            assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


async def test_cors_any_origin_without_credentials(engine: AsyncEngine, tmp_path: Path) -> None:
    async with app_client(engine, tmp_path, cors_origins=["*"]) as client:
        for origin in (ORIGIN, OTHER):
            pre = await client.options("/v1/chat/completions", headers={"Origin": origin, **PREFLIGHT})
            assert pre.status_code == 200
            got = cors_headers(pre)
            assert got["access-control-allow-origin"] == "*"
            assert "authorization" in got["access-control-allow-headers"]
            # "*" and credentials are exclusive (browsers reject the pair)
            assert "access-control-allow-credentials" not in got
            resp = await client.get("/v1/models", headers={"Origin": origin, "Cookie": "a=b"})
            assert resp.headers["access-control-allow-origin"] == "*"
            assert "access-control-allow-credentials" not in resp.headers


# --- a real server: SIGTERM -----------------------------------------------------------------------------
class StreamReader(threading.Thread):
    """One streamed /v1/completions request read on its own thread; `first` is set at the first text chunk."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.lines: list[str] = []
        self.text_chunks = 0
        self.error: BaseException | None = None
        self.first = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=self.body, timeout=300) as resp:
                assert resp.status_code == 200
                for line in resp.iter_lines():
                    if line:
                        self.lines.append(line)
                    if line.startswith("data: {") and json.loads(line[6:]).get("choices"):
                        self.text_chunks += 1
                        self.first.set()
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()
            self.first.set()

    def completion_id(self) -> str:
        return str(json.loads(self.lines[0][len("data: ") :])["id"])


def _long_stream(model: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": "Once upon a time",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def _wait_refused(url: str, deadline_s: float = 30.0) -> None:
    """Until a new connection is refused. Before that only a normal answer is acceptable: Uvicorn notices
    the signal at its next tick (0.1 s), and a request in that window is served like any other; one still
    in the listen backlog when the socket closes is reset."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(url, timeout=10)
        except httpx.ConnectError:
            return
        except (httpx.ReadError, httpx.RemoteProtocolError):
            continue
        assert resp.status_code in (200, 503), resp.text
        time.sleep(0.01)
    raise AssertionError("the server kept accepting connections after SIGTERM")


def _wait_for(condition: Callable[[], bool], what: str, deadline_s: float = 60.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_drains_the_in_flight_stream_and_exits_0(tmp_path: Path) -> None:
    max_tokens = 600
    with ServeProcess(tmp_path / "srv", DS_REDIS_URL="", DS_RESPONSE_CACHE="false", DS_DRAIN_TIMEOUT_S="300") as srv:
        model = httpx.get(f"{srv.url}/v1/models", timeout=30).json()["data"][0]["id"]
        reader = StreamReader(srv.url, _long_stream(model, max_tokens))
        reader.start()
        assert reader.first.wait(120) and reader.error is None
        ready = httpx.get(f"{srv.url}/health/ready", timeout=30)
        assert ready.status_code == 200 and ready.json()["num_running"] == 1

        srv.proc.send_signal(signal.SIGTERM)
        _wait_refused(f"{srv.url}/health/ready")
        # Uvicorn closes its listening socket at once, so while draining readiness (and liveness)
        # answer "connection refused", which every orchestrator reads as not ready; nothing new gets in.
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{srv.url}/health/live", timeout=10)
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=10)
        with pytest.raises(openai.APIConnectionError):
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        # all of the above happened during the drain: the stream was still running, the server still up
        assert not reader.done.is_set()
        assert srv.proc.poll() is None

        reader.join(300)
        assert reader.error is None, repr(reader.error)
        assert reader.lines[-1] == "data: [DONE]"
        usage = json.loads(reader.lines[-2][len("data: ") :])["usage"]
        assert usage["completion_tokens"] == max_tokens
        finishes = [
            c["finish_reason"]
            for line in reader.lines[:-2]
            for c in json.loads(line[len("data: ") :])["choices"]
            if c["finish_reason"]
        ]
        assert finishes == ["length"]
        assert srv.proc.wait(60) == 0


@pytest.mark.slow
def test_drain_timeout_cuts_the_rest_and_cut_streams_count_their_tokens(tmp_path: Path) -> None:
    data_dir = tmp_path / "srv"
    max_tokens = 1900  # far more than a second of decoding; ServeProcess's context is 2048
    with ServeProcess(
        data_dir, DS_REDIS_URL="", DS_RESPONSE_CACHE="false", DS_DRAIN_TIMEOUT_S="1", DS_LOG_FORMAT="json"
    ) as srv:
        model = httpx.get(f"{srv.url}/v1/models", timeout=30).json()["data"][0]["id"]
        received: dict[str, int] = {}
        # a client that goes away mid-stream
        with httpx.stream(
            "POST", f"{srv.url}/v1/completions", json=_long_stream(model, max_tokens), timeout=60
        ) as resp:
            chunks = 0
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    data = json.loads(line[len("data: ") :])
                    chunks += 1
                    if chunks == 5:
                        received[data["id"]] = chunks
                        break

        def idle() -> bool:
            return httpx.get(f"{srv.url}/health", timeout=30).json()["num_running"] == 0

        _wait_for(idle, "the disconnected stream to be aborted")
        # a stream longer than the drain timeout
        reader = StreamReader(srv.url, _long_stream(model, max_tokens))
        reader.start()
        _wait_for(lambda: reader.text_chunks >= 5 or reader.done.is_set(), "five chunks")
        srv.proc.send_signal(signal.SIGTERM)
        reader.join(120)
        assert srv.proc.wait(60) == 0
    assert reader.lines and "data: [DONE]" not in reader.lines  # cut, not finished
    assert isinstance(reader.error, (httpx.RemoteProtocolError, httpx.ReadError)), repr(reader.error)
    received[reader.completion_id()] = reader.text_chunks

    # both cut requests are accounted with the tokens they got (each text chunk holds at least one)
    with sqlite3.connect(data_dir / "deepseek.db") as db:
        rows = {
            r[0]: r[1:] for r in db.execute("SELECT request_id, finish_reason, completion_tokens FROM usage_records")
        }
    for completion_id, chunks in received.items():
        finish_reason, completion_tokens = rows[completion_id]
        assert finish_reason == "abort"
        assert chunks <= completion_tokens < max_tokens, (completion_id, chunks, completion_tokens)
    lines = [json.loads(line) for line in srv.stderr().splitlines() if line.startswith("{")]
    finished = [e for e in lines if any(cid in str(e["message"]) for cid in received)]
    assert len(finished) == 2
    for entry in finished:
        tokens = re.search(r"(\d+) completion tokens", str(entry["message"]))
        assert tokens is not None and int(tokens.group(1)) > 0
    # the cut is one warning carrying the request's id, not Uvicorn's ASGI traceback at ERROR
    assert not [e for e in lines if "Exception in ASGI application" in str(e["message"])]
    cut = [e for e in lines if "drain timeout ended it" in str(e["message"])]
    assert len(cut) == 1 and cut[0]["level"] == "warning" and cut[0]["request_id"] not in ("", "-", None), cut


# --- a real server: two workers ---------------------------------------------------------------------------
@pytest.mark.slow
def test_two_workers_serve_the_openai_clients_and_stop_on_sigterm(tmp_path: Path) -> None:
    with ServeProcess(
        tmp_path / "srv", args=("--workers", "2"), DS_REDIS_URL="", DS_RESPONSE_CACHE="false", DS_LOG_FORMAT="json"
    ) as srv:

        def startups() -> list[dict[str, Any]]:
            lines = [json.loads(line) for line in srv.stderr().splitlines() if line.startswith("{")]
            return [e for e in lines if e["message"] == "Application startup complete."]

        _wait_for(lambda: len(startups()) == 2, "both workers to load the model", 180)

        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        chat = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0
        )
        assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage is not None
        comp = client.completions.create(
            model=model, prompt="One, two,", max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
        )
        assert comp.usage is not None and comp.usage.completion_tokens == 4

        async def streams() -> list[int]:
            aclient = openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)

            async def one(i: int) -> int:
                stream = await aclient.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": f"Story {i}"}],
                    max_tokens=6,
                    seed=i,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True},
                )
                tokens = -1
                async for chunk in stream:
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
                return tokens

            try:
                return await asyncio.gather(*(one(i) for i in range(8)))
            finally:
                await aclient.close()

        assert asyncio.run(streams()) == [6] * 8
        metrics = httpx.get(f"{srv.url}/metrics", timeout=30).text
        # each worker holds its own engine of DS_MAX_BATCH_SIZE=4 slots; /metrics sums both
        assert re.search(r"^llm_max_batch_size 8(\.0)?$", metrics, re.M)

        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(120) == 0
    lines = [json.loads(line) for line in srv.stderr().splitlines() if line.startswith("{")]
    started = {m.group(1) for e in lines if (m := re.fullmatch(r"Started server process \[(\d+)\]", e["message"]))}
    finished = {m.group(1) for e in lines if (m := re.fullmatch(r"Finished server process \[(\d+)\]", e["message"]))}
    assert len(started) == 2 and finished == started  # both workers shut down gracefully
    for pid in started:
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)
