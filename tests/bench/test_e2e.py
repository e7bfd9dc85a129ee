"""`deepseek-serve bench` end to end: real server processes with the real default model.

- against `deepseek-serve serve`: the CLI in a subprocess (closed and open loop), then an overload
  run against a server with a one-slot batch and a one-request queue (excess must come back 429,
  never 5xx), and a wrong model name (404 counted by status)
- against bench/baseline_server.py (transformers generate() behind a lock): the chunk-counting
  fallback when no usage chunk is asked for, and the official `openai` client streaming from it
"""

from __future__ import annotations

import contextlib
import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from deepseek_serve.bench.benchmark import BenchConfig, run_benchmark
from deepseek_serve.bench.report import load_json
from deepseek_serve.bench.runner import Phase
from tests.support.net import free_port
from tests.support.server import REPO, ServeProcess, ServerProcess, clean_env

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@contextlib.contextmanager
def deepseek_serve(tmp: Path, **settings: str) -> Iterator[tuple[str, int]]:
    """`deepseek-serve serve` with auth and Redis off; yields its URL and process id."""
    env = {"DS_AUTH": "off", "DS_LOG_LEVEL": "warning", "DS_REDIS_URL": "", **settings}
    with ServeProcess(tmp, timeout_s=240, **env) as server:
        assert server.proc is not None
        yield server.url, server.proc.pid


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    with deepseek_serve(tmp_path_factory.mktemp("bench-serve"), DS_MAX_BATCH_SIZE="4") as server:
        yield server


def test_cli_closed_and_open_loop(served: tuple[str, int], tmp_path: Path) -> None:
    url, pid = served
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "deepseek_serve",
        "bench",
        "--base-url",
        url,
        "-c",
        "2",
        "-r",
        "4",
        "-n",
        "4",
        "--max-tokens",
        "4",
        "--ignore-eos",
        "--warmup",
        "1",
        "--label",
        "e2e",
        "--server-pid",
        str(pid),
        "-o",
        str(out),
        "--no-progress",
    ]
    done = subprocess.run(command, env=clean_env(COLUMNS="200"), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "c=2" in done.stdout and "rate=4/s" in done.stdout

    doc = load_json(out / "results.json")
    assert doc["meta"]["label"] == "e2e" and doc["meta"]["model"]
    assert [p["label"] for p in doc["phases"]] == ["c=2", "rate=4/s"]
    for phase in doc["phases"]:
        m = phase["metrics"]
        assert m["num_ok"] == 4 and m["error_rate"] == 0.0 and m["errors_by_status"] == {}
        assert m["usage_reported"] is True
        assert m["output_tokens"] == 16  # ignore_eos: exactly max_tokens each
        assert m["output_token_throughput"] > 0
        assert phase["server_peak_rss_bytes"] > 50 * 2**20  # the model is loaded in that process
        for r in phase["requests"]:
            assert r["prompt_tokens"] > 0
            assert 0 < r["ttft"] <= r["e2e"]
            assert r["finish_reason"] == "length"
        assert m["itl"]["count"] >= 4  # at least one gap per request after the first token
    # open loop: four distinct send times from the seeded schedule, first at ~0
    sends = sorted(r["sent_at"] for r in doc["phases"][1]["requests"])
    assert sends[0] < 0.5 and len(set(sends)) == 4
    md = (out / "report.md").read_text()
    assert "| c=2 | 4 | 0.0% |" in md and "| rate=4/s | 4 | 0.0% |" in md
    for name in ("throughput.png", "latency.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)


async def test_wrong_model_counts_404(served: tuple[str, int]) -> None:
    url, _ = served
    config = BenchConfig(
        base_url=url, phases=(Phase("closed", 2, num_requests=3),), model="no-such-model", max_tokens=2
    )
    doc = await run_benchmark(config)
    m = doc["phases"][0]["metrics"]
    assert m["num_ok"] == 0 and m["errors_by_status"] == {"404": 3}
    assert "no-such-model" in doc["phases"][0]["requests"][0]["error"]


async def test_overload_is_answered_429_not_5xx(tmp_path: Path) -> None:
    # one batch slot and one queue place: 12 requests at 40/s must overflow
    limits = {"DS_MAX_BATCH_SIZE": "1", "DS_MAX_QUEUE_SIZE": "1", "DS_RESPONSE_CACHE": "false"}
    with deepseek_serve(tmp_path, **limits) as (url, _):
        config = BenchConfig(
            base_url=url, phases=(Phase("open", 40.0, num_requests=12),), max_tokens=16, ignore_eos=True, seed=1
        )
        doc = await run_benchmark(config)
    m = doc["phases"][0]["metrics"]
    assert m["num_ok"] >= 1
    assert set(m["errors_by_status"]) == {"429"}, m["errors_by_status"]
    assert m["errors_by_status"]["429"] >= 1
    assert m["num_ok"] + m["errors_by_status"]["429"] == 12


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None,
    reason="the baseline server needs the torch extra: pip install -e '.[dev,torch]'",
)
async def test_baseline_server_chunk_counting_and_openai_client(tmp_path: Path) -> None:
    import openai

    port = free_port()
    command = [sys.executable, str(REPO / "bench" / "baseline_server.py"), "--port", str(port), "--threads", "1"]
    ready = f"http://127.0.0.1:{port}/v1/models"
    log = tmp_path / "baseline.log"
    baseline = ServerProcess(command, ready_url=ready, log_path=log, env=clean_env(), timeout_s=240)
    with baseline:
        url = f"http://127.0.0.1:{port}/v1"
        config = BenchConfig(
            base_url=url,
            phases=(Phase("closed", 2, num_requests=2),),
            max_tokens=4,
            ignore_eos=True,
            stream_usage=False,
        )
        doc = await run_benchmark(config)
        m = doc["phases"][0]["metrics"]
        assert m["num_ok"] == 2 and m["usage_reported"] is False
        # no usage chunk: one token per streamed chunk; the baseline streams one chunk per token
        assert [r["output_tokens"] for r in doc["phases"][0]["requests"]] == [4, 4]
        # behind the lock the second request waits for the first: its TTFT is at least the first's E2E
        first, second = sorted(doc["phases"][0]["requests"], key=lambda r: r["ttft"])
        assert second["sent_at"] + second["ttft"] > first["sent_at"] + first["e2e"] - 0.25

        client = openai.AsyncOpenAI(base_url=url, api_key="unused")
        stream = await client.chat.completions.create(
            model=doc["meta"]["model"],
            messages=[{"role": "user", "content": "Say hi."}],
            max_tokens=3,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 3
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="m", messages=[], max_tokens=3)
