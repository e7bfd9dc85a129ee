"""A real `deepseek-serve serve` process on a loopback port, driven by the official `openai` SDK."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.server import ServeProcess


class Server(ServeProcess):
    """The server with the engine's own defaults (batch 8, context 4096, all cores), Redis and the
    response cache off; started on construction."""

    def __init__(self, tmp: Path, **env: str) -> None:
        defaults = {"DS_MAX_BATCH_SIZE": "8", "DS_CONTEXT_LENGTH": "4096", "DS_N_THREADS": "0"}
        settings = {"DS_RESPONSE_CACHE": "false", "DS_REDIS_URL": "", "DS_LOG_LEVEL": "warning"}
        super().__init__(tmp, **{**defaults, **settings, **env})
        self.start()
        self.model = httpx.get(f"{self.url}/v1/models").json()["data"][0]["id"]

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/health").json()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("srv"), DS_MAX_BATCH_SIZE="8", DS_MAX_QUEUE_SIZE="32")
    yield srv
    srv.stop()


def _sync(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def _async(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def test_sync_chat_and_completions(server: Server) -> None:
    client = _sync(server)
    chat = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=6,
        temperature=0,
        n=2,
        logprobs=True,
        top_logprobs=1,
    )
    assert len(chat.choices) == 2
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy
    assert chat.usage is not None and chat.usage.completion_tokens == sum(
        len(c.logprobs.content or []) for c in chat.choices if c.logprobs
    )
    comp = client.completions.create(model=server.model, prompt=["One, two,", "A B C"], max_tokens=5, temperature=0)
    assert [c.index for c in comp.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in comp.choices)
    assert comp.usage is not None and comp.usage.completion_tokens == 10
    # stop: the text never contains the stop string and finish_reason is "stop"
    free = client.completions.create(model=server.model, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    word = free.choices[0].text.strip()[:2]
    stopped = client.completions.create(
        model=server.model, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[word]
    )
    assert word not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_sync_stream(server: Server) -> None:
    stream = _sync(server).chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Count"}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 8
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


async def test_16_concurrent_streams(server: Server) -> None:
    client = _async(server)

    async def one(i: int) -> tuple[int, int]:
        stream = await client.completions.create(
            model=server.model,
            prompt=f"Story {i}:",
            max_tokens=6,
            temperature=0.7,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        text_chunks, usage = 0, None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                text_chunks += 1
            if chunk.usage is not None:
                usage = chunk.usage
        assert usage is not None
        return text_chunks, usage.completion_tokens

    results = await asyncio.gather(*(one(i) for i in range(16)))
    assert all(tokens == 6 and chunks >= 1 for chunks, tokens in results)


async def test_async_chat_json(server: Server) -> None:
    chat = await _async(server).chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    assert chat.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.NotFoundError):
        await _async(server).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as info:
        await _async(server).chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "x"}], temperature=9
        )
    assert info.value.param == "temperature"


async def test_disconnect_frees_capacity(server: Server) -> None:
    body = {"model": server.model, "prompt": "Long", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
        http.stream("POST", "/v1/completions", json=body) as resp,
    ):
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                break
        assert server.stats()["num_running"] == 1
    # closed mid-stream: the sequence is aborted well before its 2000 tokens
    deadline = time.monotonic() + 5
    # polls another process; no event to wait on
    while server.stats()["num_running"] and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    assert server.stats()["num_running"] == 0


def test_overload_and_sigterm(tmp_path: Path) -> None:
    # the drain must outlast the queued work even on a loaded machine: what is tested is that SIGTERM
    # lets the stream finish, not how long the default drain timeout is
    srv = Server(
        tmp_path, DS_MAX_BATCH_SIZE="2", DS_MAX_QUEUE_SIZE="2", DS_KEEPALIVE_INTERVAL_S="0.2", DS_DRAIN_TIMEOUT_S="300"
    )
    try:

        async def fire() -> list[tuple[int, float, str | None]]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as http:

                async def one(i: int) -> tuple[int, float, str | None]:
                    t0 = time.monotonic()
                    r = await http.post(
                        "/v1/completions",
                        json={"model": srv.model, "prompt": f"N{i}", "max_tokens": 24, "ignore_eos": True},
                    )
                    return r.status_code, time.monotonic() - t0, r.headers.get("retry-after")

                return await asyncio.gather(*(one(i) for i in range(10)))

        results = asyncio.run(fire())
        codes = [c for c, _, _ in results]
        assert not [c for c in codes if c >= 500]
        assert codes.count(200) >= 4 and codes.count(429) >= 1 and set(codes) <= {200, 429}
        assert all(ra is not None and float(ra) >= 1 and dt < 2 for c, dt, ra in results if c == 429)

        # keep-alive comments while queued; SIGTERM mid-stream: the stream still completes, exit code 0
        async def drain() -> bytes:
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as http:
                body = {"model": srv.model, "prompt": "x", "max_tokens": 40, "ignore_eos": True, "stream": True}
                # two blockers hold both batch slots long past a keep-alive interval, so the stream waits
                blocking = {**body, "stream": False, "max_tokens": 600}
                blockers = [asyncio.ensure_future(http.post("/v1/completions", json=blocking)) for _ in range(2)]
                deadline = time.monotonic() + 60
                while srv.stats()["num_running"] < 2:
                    assert time.monotonic() < deadline, "the blockers never ran"
                    await asyncio.sleep(0.02)
                async with http.stream("POST", "/v1/completions", json=body) as resp:
                    srv.proc.send_signal(signal.SIGTERM)
                    raw = b"".join([c async for c in resp.aiter_bytes()])
                await asyncio.gather(*blockers)
                return raw

        raw = asyncio.run(drain())
        assert b": keep-alive" in raw and raw.rstrip().endswith(b"data: [DONE]")
        assert srv.proc is not None and srv.proc.wait(300) == 0
    finally:
        srv.stop()
