"""HTTP overhead benchmark: tokens/s through `deepseek-serve serve` (SSE) vs the in-process engine.

Both sides run 8 concurrent greedy streams of 128 new tokens (ignore_eos) over fixed prompts; then
requests/s of /health/live with 32 concurrent keep-alive connections. Prints a table and the ratio.

    .venv/bin/python bench/http_throughput.py [--streams 8] [--tokens 128] [--rounds 2]

"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import orjson

from common import free_port

PROMPTS = [f"Write a short story about a robot number {i}." for i in range(64)]


async def http_round(url: str, model: str, streams: int, tokens: int, offset: int) -> tuple[int, float]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:

        async def one(i: int) -> int:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": PROMPTS[offset + i]}],
                "max_tokens": tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            used = 0
            async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                async for line in resp.aiter_lines():
                    if line.startswith("data: {"):
                        usage = orjson.loads(line[6:]).get("usage")
                        if usage:
                            used = usage["completion_tokens"]
            return used

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(streams)))
        return sum(counts), time.perf_counter() - t0


async def engine_round(streams: int, tokens: int, offset: int, threads: int) -> tuple[int, float]:
    from deepseek_serve.config import load_settings
    from deepseek_serve.engine.async_engine import AsyncEngine
    from deepseek_serve.engine.types import GenerationRequest, SamplingParams

    engine = AsyncEngine.from_settings(load_settings(_env_file=None, n_threads=threads, max_batch_size=streams))
    await engine.start()
    try:

        async def one(i: int) -> int:
            prompt = engine.render_chat([{"role": "user", "content": PROMPTS[offset + i]}])
            _, last = await engine.complete(
                GenerationRequest(
                    f"b{i}",
                    prompt=prompt,
                    add_special_tokens=False,
                    params=SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True),
                )
            )
            assert last.usage is not None
            return last.usage.completion_tokens

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(streams)))
        return sum(counts), time.perf_counter() - t0
    finally:
        await engine.shutdown()


async def health_rps(url: str, seconds: float = 3.0, conns: int = 32) -> float:
    done = 0
    stop = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=conns)) as http:

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                r = await http.get("/health/live")
                assert r.status_code == 200
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conns)))
        return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="DS_N_THREADS for both sides (0 = physical cores)")
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DS_")}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        env.update(
            {
                "DS_DATA_DIR": tmp,
                "DS_RESPONSE_CACHE": "false",
                "DS_LOG_LEVEL": "warning",
                "DS_MAX_BATCH_SIZE": str(args.streams),
                "DS_N_THREADS": str(args.threads),
            }
        )
        command = [sys.executable, "-m", "deepseek_serve", "serve", "--port", str(port)]
        proc = subprocess.Popen(command, env=env, cwd=tmp)
        try:
            while True:
                try:
                    if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.3)
            model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            asyncio.run(http_round(url, model, 2, 8, 0))  # warm-up
            http_runs = [
                asyncio.run(http_round(url, model, args.streams, args.tokens, r * args.streams))
                for r in range(args.rounds)
            ]
            rps = asyncio.run(health_rps(url))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    engine_runs = [
        asyncio.run(engine_round(args.streams, args.tokens, r * args.streams, args.threads)) for r in range(args.rounds)
    ]
    http_tps = max(n / dt for n, dt in http_runs)
    eng_tps = max(n / dt for n, dt in engine_runs)
    print(f"n_threads={args.threads or 'physical cores'}")
    print(f"| path | streams | new tokens each | best tok/s over {args.rounds} rounds |")
    print("|---|---|---|---|")
    print(f"| in-process AsyncEngine | {args.streams} | {args.tokens} | {eng_tps:.1f} |")
    print(f"| HTTP SSE (serve, 1 worker) | {args.streams} | {args.tokens} | {http_tps:.1f} |")
    print(f"\nHTTP / in-process: {http_tps / eng_tps:.2f}x")
    print(f"/health/live: {rps:.0f} requests/s (32 connections, httpx client on the same machine)")


if __name__ == "__main__":
    main()
