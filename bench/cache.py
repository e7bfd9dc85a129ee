"""Response-cache and Redis-outage benchmark against a real `deepseek-serve serve` process.

Part 1 (cache): for each fixed deterministic prompt (temperature 0), time the request with the
cache bypassed (`"cache": false`, the engine runs) and served from the cache (a repeat), several
rounds each; print the median of both and their ratio (target: cached <= 10% of uncached).

Part 2 (limiter): the cost of `admit` + `settle` in process and through Redis (one process).

Part 3 (outage): a private redis-server on a free port; send requests, kill Redis a third of the
way in, restart it two thirds in; count failed requests (target: 0) and check that the cache
answers again afterwards.

    .venv/bin/python bench/cache.py [--rounds 5] [--max-tokens 64] [--outage-requests 60] \
        [--parts cache,limiter,outage]

Needs a Redis on 127.0.0.1:6379 for parts 1 and 2 (keys under a random prefix, deleted afterwards) and
`redis-server` on PATH for part 3.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.cache import (  # noqa: E402 - the test helpers are the one place that starts servers
    SHARED_REDIS_URL,
    CacheAppServer,
    PrivateRedis,
    delete_prefix,
    unique_prefix,
)

SEED = 1234
PROMPTS = (
    "Explain what a hash table is in three sentences.",
    "Write a haiku about the sea.",
    "List five uses of Python.",
    "What is the capital of France? Answer briefly, then explain why.",
    "Describe a sunrise to someone who has never seen one.",
)


def chat(client: httpx.Client, model: str, prompt: str, max_tokens: int, cache: bool) -> tuple[float, str, str]:
    """One request; returns (seconds, x-cache header or '-', content)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "cache": cache,
    }
    start = time.perf_counter()
    response = client.post("/v1/chat/completions", json=body)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    return elapsed, response.headers.get("x-cache", "-"), response.json()["choices"][0]["message"]["content"]


def bench_cache(rounds: int, max_tokens: int, workdir: Path, threads: str) -> list[tuple[str, float, float]]:
    prefix = unique_prefix()
    rows: list[tuple[str, float, float]] = []
    try:
        with (
            CacheAppServer(
                workdir / "cache", DS_REDIS_URL=SHARED_REDIS_URL, DS_REDIS_KEY_PREFIX=prefix, DS_N_THREADS=threads
            ) as server,
            httpx.Client(base_url=server.url, timeout=600) as client,
        ):
            model = client.get("/v1/models").json()["data"][0]["id"]
            chat(client, model, "warm up", 4, cache=False)
            for prompt in PROMPTS:
                _, first_state, first = chat(client, model, prompt, max_tokens, cache=True)  # fills the entry
                assert first_state == "miss", first_state
                uncached = [chat(client, model, prompt, max_tokens, cache=False)[0] for _ in range(rounds)]
                cached = []
                for _ in range(rounds):
                    seconds, state, content = chat(client, model, prompt, max_tokens, cache=True)
                    assert state == "hit" and content == first, "the cache must return the same answer"
                    cached.append(seconds)
                rows.append((prompt, statistics.median(uncached), statistics.median(cached)))
                print(
                    f"  {prompt[:30]}: {rows[-1][1] * 1000:.0f} ms / {rows[-1][2] * 1000:.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        delete_prefix(SHARED_REDIS_URL, prefix)
    return rows


def bench_outage(num_requests: int, workdir: Path, threads: str) -> dict[str, object]:
    redis_server = PrivateRedis()
    redis_server.start()
    failures: list[str] = []
    latencies: list[float] = []
    try:
        with (
            CacheAppServer(
                workdir / "outage",
                DS_REDIS_URL=redis_server.url,
                DS_REDIS_KEY_PREFIX=unique_prefix(),
                DS_DEFAULT_RPM="100000",
                DS_DEFAULT_TPM="100000000",
                DS_BREAKER_RESET_S="1",
                DS_N_THREADS=threads,
            ) as server,
            httpx.Client(base_url=server.url, timeout=600) as client,
        ):
            model = client.get("/v1/models").json()["data"][0]["id"]
            rng = random.Random(SEED)
            for i in range(num_requests):
                if i == num_requests // 3:
                    redis_server.kill()
                if i == 2 * num_requests // 3:
                    redis_server.start()
                prompt = rng.choice(PROMPTS)
                try:
                    seconds, _, _ = chat(client, model, prompt, 8, cache=True)
                    latencies.append(seconds)
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
            time.sleep(1.5)
            chat(client, model, "after the outage", 8, cache=True)
            _, state, _ = chat(client, model, "after the outage", 8, cache=True)
    finally:
        redis_server.kill()
    return {
        "requests": num_requests,
        "failed": len(failures),
        "cache_after_restart": state,
        "p50_ms": statistics.median(latencies) * 1000 if latencies else float("nan"),
    }


def bench_limiter(num_calls: int) -> list[tuple[str, float, float]]:
    """Admission cost in one process: (backend, p50 us, p99 us) of `admit` + `settle`."""
    import asyncio

    from deepseek_serve.cache import LocalRateLimiter, RedisClient, RedisRateLimiter
    from deepseek_serve.contracts import Principal

    async def run() -> list[tuple[str, float, float]]:
        prefix = unique_prefix()
        client = RedisClient(SHARED_REDIS_URL, prefix=prefix, timeout_s=1.0)
        rows = []
        try:
            for name, limiter in (
                ("in process", LocalRateLimiter(10**9, 10**12)),
                ("Redis (Lua)", RedisRateLimiter(client, 10**9, 10**12)),
            ):
                who = Principal(key_id=1, name="bench")
                samples = []
                for _ in range(num_calls):
                    start = time.perf_counter()
                    decision = await limiter.admit(who, 512)
                    await limiter.settle(who, decision, 100)
                    samples.append((time.perf_counter() - start) * 1e6)
                samples.sort()
                rows.append((name, samples[len(samples) // 2], samples[int(len(samples) * 0.99)]))
        finally:
            await client.close()
            delete_prefix(SHARED_REDIS_URL, prefix)
        return rows

    return asyncio.run(run())


def print_limiter_table(rows: list[tuple[str, float, float]], num_calls: int) -> None:
    print(f"\n### Rate limiter: admit + settle, {num_calls} sequential calls\n")
    print("| backend | p50 us | p99 us |")
    print("|---|---:|---:|")
    for name, p50, p99 in rows:
        print(f"| {name} | {p50:.1f} | {p99:.1f} |")


def print_cache_table(rows: list[tuple[str, float, float]], args: argparse.Namespace) -> None:
    print(f"\n### Response cache (median of {args.rounds}, max_tokens={args.max_tokens}, temperature 0)\n")
    print("| prompt | uncached ms | cached ms | cached / uncached |")
    print("|---|---:|---:|---:|")
    for prompt, uncached, cached in rows:
        print(f"| {prompt[:40]} | {uncached * 1000:.1f} | {cached * 1000:.1f} | {cached / uncached:.1%} |")
    total_u = statistics.median(r[1] for r in rows)
    total_c = statistics.median(r[2] for r in rows)
    print(f"| **median** | {total_u * 1000:.1f} | {total_c * 1000:.1f} | **{total_c / total_u:.1%}** |")


def print_outage_table(outage: dict[str, object]) -> None:
    print("\n### Redis killed and restarted mid-run\n")
    print("| requests | failed | p50 ms | cache after restart |")
    print("|---:|---:|---:|---|")
    print(f"| {outage['requests']} | {outage['failed']} | {outage['p50_ms']:.1f} | {outage['cache_after_restart']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--outage-requests", type=int, default=60)
    parser.add_argument("--parts", default="cache,limiter,outage", help="comma-separated: cache, limiter, outage")
    parser.add_argument("--threads", default="1", help="DS_N_THREADS of the server (0 = physical cores)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the servers are stopped on `timeout`
    random.seed(SEED)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; commit {commit}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    with TemporaryDirectory() as tmp:
        parts = set(args.parts.split(","))
        if "cache" in parts:
            print_cache_table(bench_cache(args.rounds, args.max_tokens, Path(tmp), args.threads), args)
        if "limiter" in parts:
            print_limiter_table(bench_limiter(2000), 2000)
        if "outage" in parts:
            print_outage_table(bench_outage(args.outage_requests, Path(tmp), args.threads))


if __name__ == "__main__":
    main()
