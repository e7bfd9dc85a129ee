"""Event-loop stall benchmark: how long large request bodies take to be answered, and how much they delay
`/health/live` meanwhile, on a real `deepseek-serve serve` process (default model, one worker).

A prober sends GET /health/live every 10 ms on its own connection for the whole run; each scenario sends
its body `--rounds` times, one after another, and reports the answer time of the large request and the
probe latencies while it ran. Bodies are built from a fixed seed, so every run sends the same bytes.

Scenarios:
  idle             no large request (the probe's baseline)
  60k-messages     2 MB: 60,000 short chat messages (refused by DS_MAX_MESSAGES before parsing)
  1k-messages      2 MB: 1,000 messages of 2 KB (validated, templated and tokenized off the loop,
                   then refused: the prompt is longer than the context)
  2mb-prompt       2 MB: one /v1/completions prompt string (tokenized off the loop, then refused)
  small-chat       a 3-message chat that is served (max_tokens 1): the inline path for small inputs

    .venv/bin/python bench/loop_stall.py [--rounds 10] [--pythonpath DIR] [--only 60k-messages ...]
    .venv/bin/python bench/loop_stall.py --inline-check   # render + tokenize: inline vs worker thread

`--pythonpath` runs the server from another checkout's `src` (e.g. to measure the code before a change).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson

from common import free_port

SEED = 1234
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]


def _text(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[:chars]


def bodies(model: str) -> dict[str, tuple[str, bytes]]:
    rng = random.Random(SEED)
    many = [{"role": "user" if i % 2 == 0 else "assistant", "content": rng.choice(WORDS)} for i in range(60_000)]
    big = [{"role": "user" if i % 2 == 0 else "assistant", "content": _text(rng, 2000)} for i in range(1000)]
    return {
        "60k-messages": ("/v1/chat/completions", orjson.dumps({"model": model, "messages": many, "max_tokens": 1})),
        "1k-messages": ("/v1/chat/completions", orjson.dumps({"model": model, "messages": big, "max_tokens": 1})),
        "2mb-prompt": (
            "/v1/completions",
            orjson.dumps({"model": model, "prompt": _text(rng, 2_000_000), "max_tokens": 1}),
        ),
        "small-chat": (
            "/v1/chat/completions",
            orjson.dumps(
                {
                    "model": model,
                    "max_tokens": 1,
                    "temperature": 0,
                    "cache": False,
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello!"},
                    ],
                }
            ),
        ),
    }


@dataclass
class Result:
    name: str
    body_bytes: int
    statuses: list[int] = field(default_factory=list)
    answer_ms: list[float] = field(default_factory=list)
    probe_ms: list[float] = field(default_factory=list)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def probe(url: str, stop: threading.Event, sink: list[float]) -> None:
    """Runs in its own thread with its own connection, so the client sending a large body does not
    delay the probes on this side."""
    with httpx.Client(base_url=url, timeout=60) as http:
        while not stop.is_set():
            started = time.perf_counter()
            http.get("/health/live")
            sink.append((time.perf_counter() - started) * 1000)
            time.sleep(0.01)


async def scenario(url: str, name: str, path: str | None, body: bytes, rounds: int) -> Result:
    result = Result(name, len(body))
    stop = threading.Event()
    prober = threading.Thread(target=probe, args=(url, stop, result.probe_ms), daemon=True)
    prober.start()
    await asyncio.sleep(0.2)
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for _ in range(rounds):
            if path is None:
                await asyncio.sleep(0.5)
                continue
            started = time.perf_counter()
            resp = await http.post(path, content=body, headers={"content-type": "application/json"})
            result.answer_ms.append((time.perf_counter() - started) * 1000)
            result.statuses.append(resp.status_code)
            await asyncio.sleep(0.05)
    stop.set()
    await asyncio.to_thread(prober.join)
    return result


async def main_async(url: str, rounds: int, only: list[str] | None) -> list[Result]:
    async with httpx.AsyncClient(base_url=url) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
    results = [await scenario(url, "idle", None, b"", rounds)]
    for name, (path, body) in bodies(model).items():
        if only and name not in only:
            continue
        results.append(await scenario(url, name, path, body, rounds))
    return results


def inline_vs_thread(repeats: int) -> None:
    """Render + tokenize a chat inline vs in a worker thread (`asyncio.to_thread`), in process, for
    several sizes: where the handoff costs more than the work, small inputs stay on the loop."""
    from deepseek_serve.config import load_settings
    from deepseek_serve.engine.async_engine import AsyncEngine

    engine = AsyncEngine.from_settings(load_settings(_env_file=None))
    rng = random.Random(SEED)

    def work(messages: list[dict[str, str]]) -> int:
        return len(engine.tokenize(engine.render_chat(messages), add_special_tokens=False))

    async def measure() -> None:
        print(f"{'chars':>8} {'inline ms':>10} {'thread ms':>10} {'thread/inline':>14}")
        for chars in (200, 2_000, 16_000, 64_000):
            messages = [{"role": "user", "content": _text(rng, chars)}]
            work(messages)
            inline, threaded = [], []
            for _ in range(repeats):
                started = time.perf_counter()
                work(messages)
                inline.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                await asyncio.to_thread(work, messages)
                threaded.append((time.perf_counter() - started) * 1000)
            a, b = statistics.median(inline), statistics.median(threaded)
            print(f"{chars:>8} {a:>10.3f} {b:>10.3f} {b / a:>14.2f}")

    asyncio.run(measure())


def start_server(pythonpath: str | None) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="loop-stall-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DS_")}
    src = pythonpath or str(Path(__file__).resolve().parents[1] / "src")
    env.update(
        {
            "PYTHONPATH": src,
            "DS_DATA_DIR": str(tmp),
            "DS_LOG_LEVEL": "warning",
            "DS_REDIS_URL": "",
            "DS_RESPONSE_CACHE": "false",
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepseek_serve", "serve", "--port", str(port)],
        env=env,
        cwd=tmp,
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "server.stderr").open("wb"),
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {(tmp / 'server.stderr').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                return proc, url, tmp
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit("server not ready in 180 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--pythonpath", default=None, help="run the server from this src folder")
    parser.add_argument("--only", nargs="*", default=None, help="scenarios to run (idle always runs)")
    parser.add_argument(
        "--inline-check",
        action="store_true",
        help="only time render + tokenize inline vs in a worker thread, in process",
    )
    args = parser.parse_args()
    if args.inline_check:
        inline_vs_thread(args.rounds * 10)
        return
    proc, url, _ = start_server(args.pythonpath)
    try:
        results = asyncio.run(main_async(url, args.rounds, args.only))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    base_p99 = pct(results[0].probe_ms, 0.99)
    print(
        f"loop stall, seed {SEED}, {args.rounds} rounds per scenario, server src: {args.pythonpath or 'this checkout'}"
    )
    print(
        f"{'scenario':<14} {'body':>8} {'status':>8} {'answer p50':>11} {'answer max':>11} "
        f"{'live p50':>9} {'live p99':>9} {'live max':>9} {'p99/idle':>9} {'probes':>7}"
    )
    for r in results:
        status = ",".join(str(s) for s in sorted(set(r.statuses))) or "-"
        answer50 = f"{statistics.median(r.answer_ms):.1f}" if r.answer_ms else "-"
        answer_max = f"{max(r.answer_ms):.1f}" if r.answer_ms else "-"
        p99 = pct(r.probe_ms, 0.99)
        print(
            f"{r.name:<14} {r.body_bytes / 1e6:>7.2f}M {status:>8} {answer50:>11} {answer_max:>11} "
            f"{pct(r.probe_ms, 0.5):>9.1f} {p99:>9.1f} {max(r.probe_ms):>9.1f} {p99 / base_p99:>9.2f} "
            f"{len(r.probe_ms):>7}"
        )
    print("times in ms; live = GET /health/live every 10 ms while the scenario ran")


if __name__ == "__main__":
    main()
