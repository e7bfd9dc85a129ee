"""One engine process shared by several API workers (`EngineHost`, `ProcessEngine.connect`, and
`deepseek-serve serve --workers N` with DS_ENGINE_PROCESS=on): real spawned processes, the real
torch runner on a tiny random model with the real DeepSeek coder tokenizer (fp32 CPU), and the real
server under the official client."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from deepseek_serve.engine.async_engine import AsyncEngine
from deepseek_serve.engine.errors import EngineStoppedError
from deepseek_serve.engine.process import (
    _HANDSHAKE_TIMEOUT_S,
    ENGINE_AUTHKEY_ENV,
    ENGINE_SOCKET_ENV,
    EngineHost,
    ProcessEngine,
    connect_from_env,
)
from deepseek_serve.engine.types import GenerationRequest, SamplingParams
from tests.engine.pytorch.test_process import (
    CONTEXT,
    PROMPTS,
    concurrent_streams,
    request,
    serve_env,
    settings_for,
    stream_all,
)
from tests.support.server import ServeProcess
from tests.support.torch_models import CODER, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path, _ = tiny_checkpoint(tmp_path_factory.mktemp("coder"), CODER, with_tokenizer=True)
    return path


@pytest.fixture(scope="module")
def host(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineHost]:
    engine_host = EngineHost.start(settings_for(folder, tmp_path_factory.mktemp("data"), max_queue_size=16))
    yield engine_host
    engine_host.stop()
    assert engine_host.process.exitcode == 0 and not engine_host.died
    assert not Path(engine_host.address).exists()  # the socket's folder is removed


def connect(host: EngineHost) -> ProcessEngine:
    env = host.environ()
    return ProcessEngine.connect(env[ENGINE_SOCKET_ENV], bytes.fromhex(env[ENGINE_AUTHKEY_ENV]))


def test_two_workers_get_their_own_outputs(host: EngineHost, folder: Path, tmp_path: Path) -> None:
    """Two API workers stream at once through one engine process: each gets exactly its requests'
    tokens, equal to the in-thread engine's greedy outputs."""

    async def run() -> tuple[list[object], list[object], list[object]]:
        a, b = connect(host), connect(host)
        await a.start()
        await b.start()
        try:
            assert a.model_info == b.model_info and a.model_info.max_model_len == CONTEXT
            got_a, got_b = await asyncio.gather(stream_all(a, PROMPTS), stream_all(b, PROMPTS[::-1]))
        finally:
            await a.shutdown()
            await b.shutdown()
        eng = AsyncEngine.from_settings(settings_for(folder, tmp_path, engine_process="off"))
        await eng.start()
        try:
            want = await stream_all(eng, PROMPTS)
        finally:
            await eng.shutdown()
        return list(got_a), list(got_b), list(want)

    got_a, got_b, want = asyncio.run(run())
    assert got_a == want
    assert got_b == want[::-1]


def test_a_worker_leaving_ends_only_its_requests(host: EngineHost) -> None:
    """A worker cannot abort another's request; the engine's metrics are exported by exactly one
    worker, the next one once it leaves; a worker that shuts down mid-stream: its stream ends, its
    request is aborted in the engine process (the slot is freed), the other worker's stream runs on to
    its length."""

    async def run() -> None:
        a, b = connect(host), connect(host)
        await a.start()
        await b.start()
        try:
            mine = await a.add_request(request(0, "def", max_tokens=40, ignore_eos=True))
            first_a = await anext(mine)
            long_b = await b.add_request(request(1, "import", max_tokens=60, ignore_eos=True))
            first_b = await anext(long_b)
            b.abort(mine.request_id)  # not b's request: ignored by the engine process
            after = await b.add_request(request(3, "x", max_tokens=1))  # its answer: the abort was read
            assert [d.finish_reason async for d in after][-1] == "length"
            rest_mine = [d async for d in mine]
            assert len(first_a.token_ids) + sum(len(d.token_ids) for d in rest_mine) == 40
            assert rest_mine[-1].finish_reason == "length"
            async with asyncio.timeout(30):  # the engine process sends a stats snapshot while busy
                while a.metrics_snapshot().reports == b.metrics_snapshot().reports:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            assert a.metrics_snapshot().reports and not b.metrics_snapshot().reports
            long_a = await a.add_request(request(4, "def", max_tokens=150, ignore_eos=True))
            await anext(long_a)
            await a.shutdown()
            rest_a = [d async for d in long_a]
            assert rest_a[-1].finished and rest_a[-1].finish_reason in ("abort", "error")
            ids_b = list(first_b.token_ids)
            async with asyncio.timeout(60):
                async for delta in long_b:
                    ids_b.extend(delta.token_ids)
                    last = delta
            assert len(ids_b) == 60 and last.finish_reason == "length"
            async with asyncio.timeout(30):
                while not b.metrics_snapshot().reports:  # noqa: ASYNC110 - the snapshot after a leaves
                    await asyncio.sleep(0.05)
            async with asyncio.timeout(30):
                while b.stats().num_running:
                    await asyncio.sleep(0.05)
                    await b.complete(request(2, "x", max_tokens=1))  # a step sends a fresh snapshot
        finally:
            await b.shutdown()

    asyncio.run(run())


def test_wrong_key_and_missing_socket_are_refused(
    host: EngineHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(RuntimeError, match="cannot connect"):
        ProcessEngine.connect(host.address, os.urandom(32))
    with pytest.raises(RuntimeError, match="cannot connect"):
        ProcessEngine.connect(str(tmp_path / "none.sock"), os.urandom(32))
    monkeypatch.delenv(ENGINE_SOCKET_ENV, raising=False)
    assert connect_from_env() is None  # no shared engine: the worker builds its own
    monkeypatch.setenv(ENGINE_SOCKET_ENV, host.address)
    monkeypatch.setenv(ENGINE_AUTHKEY_ENV, "not hex")
    with pytest.raises(RuntimeError, match="not a hex key"):
        connect_from_env()
    # the engine process keeps serving after a failed authentication; the environment `serve` sets
    # for its workers connects
    monkeypatch.setenv(ENGINE_AUTHKEY_ENV, host.environ()[ENGINE_AUTHKEY_ENV])
    engine = connect_from_env()
    assert engine is not None

    async def run() -> str | None:
        await engine.start()
        try:
            req = GenerationRequest(
                request_id="once", prompt="def", params=SamplingParams(max_tokens=3, ignore_eos=True)
            )
            _, last = await engine.complete(req)
            return last.finish_reason
        finally:
            await engine.shutdown()

    assert asyncio.run(run()) == "length"


def test_silent_connections_do_not_hold_up_workers(host: EngineHost) -> None:
    """Connections to the engine socket that never answer the authentication challenge (a local process
    that connects and stalls) hold up no API worker, and are cut after the handshake deadline."""
    silent = []
    for _ in range(3):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(host.address)
        silent.append(sock)
    try:
        t0 = time.monotonic()
        engine = connect(host)  # would wait behind the silent ones if the handshakes were serial
        assert time.monotonic() - t0 < _HANDSHAKE_TIMEOUT_S / 2

        async def start_and_stop() -> None:
            await engine.start()
            await engine.shutdown()

        asyncio.run(start_and_stop())
        for sock in silent:
            sock.settimeout(_HANDSHAKE_TIMEOUT_S * 3)  # a timeout here: the engine never cut the connection
            data = b""
            while chunk := sock.recv(4096):  # the challenge, then end of file when the deadline cuts it
                data += chunk
            assert b"#CHALLENGE#" in data
    finally:
        for sock in silent:
            sock.close()


def test_engine_process_exit_ends_the_workers_streams(folder: Path, tmp_path: Path) -> None:
    """The shared engine process dies under an open stream: the worker's stream ends with an error
    delta, it stops accepting, and the host reports the death through `watch`."""
    engine_host = EngineHost.start(settings_for(folder, tmp_path))
    seen: list[bool] = []
    engine_host.watch(lambda: seen.append(True))

    async def run() -> None:
        engine = connect(engine_host)
        await engine.start()
        try:
            stream = await engine.add_request(request(0, "def", max_tokens=200, ignore_eos=True))
            await anext(stream)
            os.kill(engine_host.process.pid, signal.SIGKILL)
            async with asyncio.timeout(20):
                rest = [d async for d in stream]
            assert rest[-1].finish_reason == "error" and rest[-1].error is not None
            assert "closed the connection" in rest[-1].error
            assert not engine.is_accepting
            with pytest.raises(EngineStoppedError):
                await engine.add_request(request(1, "def"))
        finally:
            await engine.shutdown()

    try:
        asyncio.run(run())
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen == [True] and engine_host.died
    finally:
        engine_host.stop()


def metric(text: str, name: str) -> float:
    values = [float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)]
    assert values, f"{name} not exported"
    return sum(values)


def test_serve_with_workers_shares_one_engine(folder: Path, tmp_path: Path) -> None:
    """`serve --workers 2` with the engine process: the model is loaded once, both workers serve
    streams through it (the official client, 24 at once), the engine's token counter is exported once
    (not per worker), SIGTERM exits 0; then, with no worker count given, serve starts min(4, CPU
    count) workers over the engine process, and that process killed under the serving supervisor ends
    the server with exit code 1."""
    env = serve_env(folder, DS_MAX_BATCH_SIZE="32")
    server = ServeProcess(tmp_path / "server", args=("--workers", "2"), timeout_s=240, **env)
    with server:
        assert asyncio.run(concurrent_streams(server, 24, 10)) == [10] * 24
        deadline = time.monotonic() + 30
        while True:  # the reporting worker mirrors the engine's counters into /metrics every second
            text = httpx.get(f"{server.url}/metrics", timeout=10).text
            generated = metric(text, "llm_generation_tokens_total")
            if generated >= 240 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert 240 <= generated < 300  # 24 x 10 (+ readiness probes' one token each), not per worker
    assert server.stop() == 0
    log = server.stderr()
    assert log.count("loaded from") == 1, log[-3000:]
    assert "API workers connected: 2" in log
    assert "exited unexpectedly" not in log

    # no worker count given: with the engine process, serve starts min(4, CPU count) workers over it
    again = ServeProcess(tmp_path / "server2", timeout_s=240, **env)
    with again:
        auto = min(4, os.cpu_count() or 1)
        deadline = time.monotonic() + 60
        while f"API workers connected: {auto}" not in again.stderr() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert f"API workers connected: {auto}" in again.stderr(), again.stderr()[-3000:]
        engine_pid = int(re.search(r"engine process (\d+) serving model", again.stderr()).group(1))  # type: ignore[union-attr]
        os.kill(engine_pid, signal.SIGKILL)
        assert again.proc is not None
        code = again.proc.wait(timeout=60)
    assert code == 1, again.stderr()[-3000:]
    assert "the engine process exited unexpectedly" in again.stderr()


def test_engine_role_workers_share_one_engine(folder: Path, tmp_path: Path) -> None:
    """`serve --role engine --workers 2` with the engine process (what a gateway routes to): both
    workers answer from the one engine, so every load report over fresh connections counts the same
    generated tokens."""
    env = serve_env(folder)
    server = ServeProcess(tmp_path / "engine", args=("--role", "engine", "--workers", "2"), timeout_s=240, **env)
    with server:
        assert asyncio.run(concurrent_streams(server, 4, 6)) == [6] * 4
        deadline = time.monotonic() + 30
        while "API workers connected: 2" not in server.stderr() and time.monotonic() < deadline:
            time.sleep(0.2)
        reports = []
        for _ in range(8):  # a new connection each: the kernel spreads them over the workers
            with httpx.Client(timeout=10) as client:
                reports.append(client.get(f"{server.url}/internal/load").json())
        generated = {r["generation_tokens_total"] for r in reports}
        assert all(r["ready"] for r in reports)
        assert len(generated) == 1 and min(generated) >= 24, generated
    assert server.stop() == 0
    assert server.stderr().count("loaded from") == 1
    assert "API workers connected: 2" in server.stderr()


def test_killed_workers_are_replaced_and_their_requests_aborted(folder: Path, tmp_path: Path) -> None:
    """SIGKILL of every API worker while six streams run: the engine process sees their connections
    close and aborts all six requests (nothing keeps running for a client that is gone), Uvicorn's
    supervisor starts new workers, which connect to the same engine process and serve."""
    env = serve_env(folder, DS_CONTEXT_LENGTH="512", DS_MAX_BATCH_SIZE="8")
    server = ServeProcess(tmp_path / "server", args=("--workers", "2"), timeout_s=240, **env)
    with server:
        deadline = time.monotonic() + 60
        while server.stderr().count("Started server process") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = [int(pid) for pid in re.findall(r"Started server process \[(\d+)\]", server.stderr())]
        assert len(workers) == 2

        async def open_streams() -> None:
            client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=60, max_retries=0)
            model = (await client.models.list()).data[0].id
            streams = [
                await client.completions.create(
                    model=model, prompt=f"# {i}\n", max_tokens=480, stream=True, extra_body={"ignore_eos": True}
                )
                for i in range(6)
            ]
            for stream in streams:  # every request is running in the engine
                await anext(aiter(stream))
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            for stream in streams:  # each ends with the dropped connection
                with pytest.raises(openai.APIError):
                    async for _ in stream:
                        pass
            await client.close()

        asyncio.run(open_streams())
        deadline = time.monotonic() + 60
        while server.stderr().count("API workers connected") < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        log = server.stderr()
        aborted = [int(n) for n in re.findall(r"an API worker disconnected \((\d+) requests aborted\)", log)]
        assert sum(aborted) == 6, log[-3000:]
        assert log.count("API workers connected") == 4  # 1, 2, then the two new workers
        # the aborted requests left the batch at once (their 480 tokens would take seconds more)
        assert httpx.get(f"{server.url}/health/ready", timeout=10).json()["num_running"] == 0
        assert asyncio.run(concurrent_streams(server, 3, 5)) == [5] * 3
        ready = httpx.get(f"{server.url}/health/ready", timeout=10)
        assert ready.status_code == 200
    assert server.stop() == 0
    assert server.stderr().count("loaded from") == 1
