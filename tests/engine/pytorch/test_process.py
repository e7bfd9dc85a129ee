"""The engine in its own process (`ProcessEngine`, DS_ENGINE_PROCESS=on) against the in-thread
`AsyncEngine`: real spawned processes and the real torch runner on a tiny random model with the real
DeepSeek coder tokenizer (fp32 CPU). Outputs token for token, the same typed errors, aborts, the
engine process dying under an open stream, and the real server streaming to the official client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from deepseek_serve.config import Settings
from deepseek_serve.engine import prefix_summary
from deepseek_serve.engine.async_engine import AsyncEngine
from deepseek_serve.engine.errors import (
    ContextLengthError,
    EngineStoppedError,
    InvalidRequestError,
    QueueFullError,
)
from deepseek_serve.engine.process import _STATS_INTERVAL_S, ProcessEngine, use_engine_process
from deepseek_serve.engine.types import GenerationRequest, SamplingParams
from tests.support.server import REPO, ServeProcess
from tests.support.settings import make_settings
from tests.support.torch_models import CODER, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONTEXT = 256
PROMPTS = ["def fib(n):", "# quicksort in python\n", "import numpy as np\nx = ", "class Stack:\n    def"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path, _ = tiny_checkpoint(tmp_path_factory.mktemp("coder"), CODER, with_tokenizer=True)
    return path


def settings_for(folder: Path, tmp: Path, **overrides: object) -> Settings:
    base: dict[str, object] = {
        "model": str(folder),
        "runner": "torch",
        "device": "cpu",
        "engine_process": "on",
        "context_length": CONTEXT,
        "max_batch_size": 4,
        "max_queue_size": 4,
        "cuda_graphs": False,
    }
    return make_settings(tmp, **{**base, **overrides})


def serve_env(folder: Path, **extra: str) -> dict[str, str]:
    """`DS_*` of a server on the tiny model with the engine in its own process (CPU, torch runner)."""
    base = {
        "DS_MODEL": str(folder),
        "DS_RUNNER": "torch",
        "DS_DEVICE": "cpu",
        "DS_ENGINE_PROCESS": "on",
        "DS_CUDA_GRAPHS": "false",
        "DS_CONTEXT_LENGTH": str(CONTEXT),
    }
    return {**base, **extra}


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.Runner]:
    """One event loop for the module: the shared engine's reader thread hands messages to it."""
    with asyncio.Runner() as runner:
        yield runner


@pytest.fixture(scope="module")
def engine(folder: Path, tmp_path_factory: pytest.TempPathFactory, loop: asyncio.Runner) -> Iterator[ProcessEngine]:
    settings = settings_for(folder, tmp_path_factory.mktemp("data"))
    assert use_engine_process(settings)
    eng = ProcessEngine.from_settings(settings)
    loop.run(eng.start())
    yield eng
    loop.run(eng.shutdown(5.0))
    assert eng._process.exitcode == 0


def request(i: int, prompt: str, max_tokens: int = 12, **params: object) -> GenerationRequest:
    return GenerationRequest(
        request_id=f"r{i}-{os.urandom(4).hex()}",
        prompt=prompt,
        params=SamplingParams(max_tokens=max_tokens, temperature=0.0, **params),  # type: ignore[arg-type]
    )


async def stream_all(eng: AsyncEngine, prompts: list[str]) -> list[tuple[list[int], str, str | None]]:
    """Every prompt at once, streamed: (token ids, text, finish reason) of each."""

    async def one(i: int, prompt: str) -> tuple[list[int], str, str | None]:
        ids: list[int] = []
        text = ""
        reason = None
        async for delta in eng.generate(request(i, prompt)):
            ids.extend(delta.token_ids)
            text += delta.text
            reason = delta.finish_reason
        return ids, text, reason

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


def test_same_greedy_outputs_as_in_thread(
    engine: ProcessEngine, folder: Path, tmp_path: Path, loop: asyncio.Runner
) -> None:
    got = loop.run(stream_all(engine, PROMPTS))

    async def in_thread() -> list[tuple[list[int], str, str | None]]:
        eng = AsyncEngine.from_settings(settings_for(folder, tmp_path, engine_process="off"))
        await eng.start()
        try:
            assert eng.model_info.chat_template == engine.model_info.chat_template
            assert eng.model_info.max_model_len == engine.model_info.max_model_len == CONTEXT
            assert eng.render_chat([{"role": "user", "content": "hi"}]) == engine.render_chat(
                [{"role": "user", "content": "hi"}]
            )
            return await stream_all(eng, PROMPTS)
        finally:
            await eng.shutdown()

    want = loop.run(in_thread())
    assert got == want
    assert all(len(ids) == 12 and reason == "length" for ids, _, reason in got)


def test_validation_errors_are_the_same_typed_errors(engine: ProcessEngine, loop: asyncio.Runner) -> None:
    too_long = GenerationRequest(
        request_id="long", prompt_token_ids=(1,) * (CONTEXT + 10), params=SamplingParams(max_tokens=4)
    )
    with pytest.raises(ContextLengthError):
        loop.run(engine.add_request(too_long))
    bad_id = GenerationRequest(request_id="bad", prompt_token_ids=(1, 10**7), params=SamplingParams(max_tokens=4))
    with pytest.raises(InvalidRequestError, match="outside the vocabulary") as info:
        loop.run(engine.add_request(bad_id))
    assert info.value.param == "prompt"
    with pytest.raises(InvalidRequestError):
        engine.detokenize([10**7])
    assert engine.detokenize(engine.tokenize("def f():", add_special_tokens=False)) == "def f():"
    assert engine.num_streams == 0


def test_queue_bound_raises_queue_full(engine: ProcessEngine, loop: asyncio.Runner) -> None:
    """4 running + 4 waiting at most: of 16 long requests sent together, 8 are refused (none can end
    before the last is added)."""

    async def flood() -> list[object]:
        requests = [request(i, "x = ", max_tokens=200, ignore_eos=True) for i in range(16)]
        results = await asyncio.gather(*(engine.add_request(r) for r in requests), return_exceptions=True)
        for r in results:
            if not isinstance(r, BaseException):
                await r.aclose()
        return results

    results = loop.run(flood())
    refused = [r for r in results if isinstance(r, QueueFullError)]
    assert len(refused) == 8 and refused[0].retry_after_s >= 1.0
    assert all(not isinstance(r, BaseException) or isinstance(r, QueueFullError) for r in results)
    assert loop.run(wait_idle(engine))


async def wait_idle(eng: ProcessEngine, timeout_s: float = 20.0) -> bool:
    """True once the engine process reports nothing running or waiting."""
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                stats = eng.stats()
                if stats.num_running == 0 and stats.num_waiting == 0 and eng.num_streams == 0:
                    return True
                await asyncio.sleep(0.05)
    except TimeoutError:
        return False


def test_closing_a_stream_frees_its_sequence(engine: ProcessEngine, loop: asyncio.Runner) -> None:
    async def run() -> None:
        # past the stats snapshots' rate limit (a test before may have just had one sent), so the engine
        # reports the request running at its first step rather than after this short request is over
        await asyncio.sleep(2 * _STATS_INTERVAL_S)
        stream = await engine.add_request(request(0, "def", max_tokens=200, ignore_eos=True))
        first = await anext(stream)
        assert not first.finished
        async with asyncio.timeout(20):  # the engine reports it running
            while engine.stats().num_running == 0:  # noqa: ASYNC110 - the snapshot the engine process sends
                await asyncio.sleep(0.05)
        await stream.aclose()
        assert await wait_idle(engine)
        assert engine.stats().kv_used_tokens == 0
        # and it still serves
        _, last = await engine.complete(request(1, "def", max_tokens=3))
        assert last.finish_reason == "length" and last.usage is not None and last.usage.completion_tokens == 3

    loop.run(run())


def test_prefix_cache_clear_answers(engine: ProcessEngine, loop: asyncio.Runner) -> None:
    loop.run(engine.clear_prefix_cache())
    assert loop.run(engine.probe())


def test_killed_engine_process_ends_open_streams(folder: Path, tmp_path: Path) -> None:
    async def run() -> None:
        eng = ProcessEngine.from_settings(settings_for(folder, tmp_path))
        await eng.start()
        try:
            stream = await eng.add_request(request(0, "def", max_tokens=200, ignore_eos=True))
            await anext(stream)
            assert eng.is_accepting and eng.stats().is_running
            os.kill(eng._process.pid, signal.SIGKILL)
            async with asyncio.timeout(20):
                rest = [delta async for delta in stream]
            last = rest[-1]
            assert last.finished and last.finish_reason == "error"
            assert last.error is not None and "engine process exited" in last.error and "-9" in last.error
            assert not eng.is_accepting and not eng.stats().is_running
            with pytest.raises(EngineStoppedError):
                await eng.add_request(request(1, "def"))
        finally:
            await eng.shutdown()

    asyncio.run(run())


def test_load_failure_raises_with_the_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError, match="could not load the model"):
        ProcessEngine.from_settings(make_settings(tmp_path, model=str(empty), runner="torch", device="cpu"))


def test_server_streams_to_the_openai_client(folder: Path, tmp_path: Path) -> None:
    env = serve_env(folder, DS_LOG_FORMAT="json", DS_MAX_BATCH_SIZE="64")
    server = ServeProcess(tmp_path / "server", timeout_s=180, **env)
    with server:
        client = server.openai_client()
        chunks = list(
            client.chat.completions.create(
                model=client.models.list().data[0].id,
                messages=[{"role": "user", "content": "hello"}],
                max_tokens=8,
                temperature=0.0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert reasons[-1] == "length"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        # 64 streams at once (one per slot): every one runs to its length through the pipe
        assert asyncio.run(concurrent_streams(server, 64, 12)) == [12] * 64
    # SIGTERM to the process group: the API process drains and stops the engine process, which
    # ignores the signal itself
    assert server.stop() == 0
    assert "exited unexpectedly" not in server.stderr()
    # the engine process logs as the server does: JSON lines (the loader's line is written there)
    lines = [json.loads(line) for line in server.stderr().splitlines() if line.startswith("{")]
    assert any(r["logger"] == "deepseek_serve.engine.loader" and "loaded from" in r["message"] for r in lines)


async def concurrent_streams(server: ServeProcess, n: int, max_tokens: int) -> list[int]:
    """Completion tokens of `n` streamed completions sent together by the official async client."""
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=120)
    model = (await client.models.list()).data[0].id

    async def one(i: int) -> int:
        stream = await client.completions.create(
            model=model,
            prompt=f"# task {i}\ndef f{i}(x):",
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        return usage.completion_tokens if usage is not None else -1

    try:
        return list(await asyncio.gather(*(one(i) for i in range(n))))
    finally:
        await client.close()


def test_engine_process_setting(folder: Path, tmp_path: Path) -> None:
    import torch

    assert use_engine_process(make_settings(tmp_path, engine_process="on"))
    assert not use_engine_process(settings_for(folder, tmp_path, engine_process="off"))
    # auto: the llama.cpp runner (a pack is GGUF) and the CPU keep the engine in a thread
    assert not use_engine_process(make_settings(tmp_path, engine_process="auto"))
    assert not use_engine_process(settings_for(folder, tmp_path, engine_process="auto"))
    on_cuda = use_engine_process(settings_for(folder, tmp_path, engine_process="auto", device="auto", runner="auto"))
    assert on_cuda == torch.cuda.is_available()


def test_prefix_summary_follows_the_cache(engine: ProcessEngine, loop: asyncio.Runner) -> None:
    """A finished request's prompt stays in the prefix cache; the summary the engine process sends
    on going idle holds its blocks, and is empty again after a clear."""
    ids = tuple(range(100, 170))  # 70 tokens: two whole blocks

    async def run() -> tuple[str, str]:
        await engine.clear_prefix_cache()
        prompt = GenerationRequest(request_id="prefix", prompt_token_ids=ids, params=SamplingParams(max_tokens=2))
        await engine.complete(prompt)
        async with asyncio.timeout(20):
            while not engine.prefix_cache_summary():  # noqa: ASYNC110 - the snapshot the engine process sends
                await asyncio.sleep(0.05)
        held = engine.prefix_cache_summary()
        await engine.clear_prefix_cache()
        await engine.complete(request(1, "x", max_tokens=1))  # a step after the clear, then idle again
        async with asyncio.timeout(20):
            while engine.prefix_cache_summary() == held:  # noqa: ASYNC110 - as above
                await asyncio.sleep(0.05)
        return held, engine.prefix_cache_summary()

    held, after = loop.run(run())
    blocks = prefix_summary.block_hashes(ids)
    assert len(blocks) == 2 and set(blocks) <= prefix_summary.decode(held)
    assert not set(blocks) & prefix_summary.decode(after)


def test_engine_process_exits_when_the_api_process_dies(folder: Path, tmp_path: Path) -> None:
    """The API process is SIGKILLed: the engine process sees the pipe close and exits on its own."""
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from deepseek_serve.engine.process import ProcessEngine\n"
        "from tests.support.settings import make_settings\n"
        "settings = make_settings(Path(sys.argv[2]), model=sys.argv[1], runner='torch', device='cpu',\n"
        "    engine_process='on', context_length=256, max_batch_size=4, cuda_graphs=False)\n"
        "engine = ProcessEngine.from_settings(settings)\n"
        "print(engine._process.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-c", script, str(folder), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    pid = int(done.stdout.split()[0])
    deadline = time.monotonic() + 30
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(pid)


def running(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
