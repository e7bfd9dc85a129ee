"""Streaming load from several client processes, so that the client is not what sets the pace.

One Python process parsing SSE with httpx tops out at a few thousand events per second, below what
a GPU server streams at 64+ concurrent requests. This splits a closed-loop load (`concurrency`
streams, `num_requests` in all, `deepseek-serve bench`'s request and timing code and its `short`
workload) over `procs` processes that start together, and merges what they measured: output tokens
per second over the whole run (first send to last end), TTFT and ITL percentiles over all requests,
and SSE events received per second.

    python bench/sse_load.py --url http://127.0.0.1:8000 -c 64 -n 128 --procs 4 --max-tokens 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import queue
import time
from typing import Any

import httpx

from deepseek_serve.bench.client import ClientOptions, send
from deepseek_serve.bench.workloads import Workload


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def _worker_main(
    url: str, model: str, concurrency: int, indexes: list[int], max_tokens: int, barrier: Any
) -> list[dict[str, Any]]:
    workload = Workload("short", seed=0, max_tokens=max_tokens)
    options = ClientOptions(model=model, ignore_eos=True)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    rows: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=url + "/v1", limits=limits, timeout=600.0) as client:
        (await client.get("/models")).raise_for_status()
        await asyncio.to_thread(barrier.wait)  # every process imported and connected: start together
        t0 = time.perf_counter()
        wall0 = time.time()
        todo = list(indexes)

        async def loop() -> None:
            while todo:
                i = todo.pop(0)
                sent = time.perf_counter() - t0
                r = await send(client, workload.request(i), options, sent_at=sent)
                rows.append(
                    {
                        "start": wall0 + sent,
                        "end": wall0 + sent + r.e2e,
                        "ok": r.ok,
                        "error": r.error,
                        "ttft": r.ttft,
                        "tokens": r.output_tokens,
                        "itl": r.itl,
                    }
                )

        await asyncio.gather(*(loop() for _ in range(concurrency)))
    return rows


def _worker(args: tuple[str, str, int, list[int], int], barrier: Any, results: Any) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        results.put(asyncio.run(_worker_main(*args, barrier)))
    except BaseException as exc:
        barrier.abort()
        results.put(exc)


def deal(concurrency: int, num_requests: int, procs: int) -> tuple[list[int], list[list[int]]]:
    """Streams and request indexes per client process. Requests go in proportion to each process's
    streams, so that every stream runs as many requests (num_requests / concurrency of them when that
    divides): dealt round robin instead, a process with fewer streams would run one request more than
    its streams hold and end the phase alone."""
    procs = max(1, min(procs, concurrency))
    shares = [concurrency // procs + (1 if p < concurrency % procs else 0) for p in range(procs)]
    quotas = [share * num_requests // concurrency for share in shares]
    for p in range(num_requests - sum(quotas)):
        quotas[p % procs] += 1
    indexes: list[list[int]] = []
    start = 0
    for quota in quotas:
        indexes.append(list(range(start, start + quota)))
        start += quota
    return shares, indexes


def run_load(
    url: str,
    concurrency: int,
    num_requests: int,
    procs: int,
    max_tokens: int,
    model: str | None = None,
    timeout_s: float = 900.0,
) -> dict[str, Any]:
    """One closed-loop phase split over `procs` processes; the merged figures. TimeoutError (the client
    processes stopped) when it has not ended after `timeout_s`."""
    if model is None:
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    shares, indexes = deal(concurrency, num_requests, procs)
    procs = len(shares)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(procs)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=_worker, args=((url, model, shares[p], indexes[p], max_tokens), barrier, results))
        for p in range(procs)
    ]
    for w in workers:
        w.start()
    try:
        parts = [results.get(timeout=timeout_s) for _ in workers]
    except queue.Empty:
        for w in workers:
            w.terminate()
        raise TimeoutError(f"the load of {concurrency} streams did not end in {timeout_s:.0f} s") from None
    for w in workers:
        w.join(30)
    for part in parts:
        if isinstance(part, BaseException):
            raise RuntimeError(f"a client process failed: {part!r}")
    rows = [r for part in parts for r in part]
    ok = [r for r in rows if r["ok"]]
    elapsed = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    tokens = sum(r["tokens"] for r in ok)
    itl = [x for r in ok for x in r["itl"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    return {
        "streams": concurrency,
        "procs": procs,
        "requests": len(rows),
        "ok": len(ok),
        "errors": sorted({str(r["error"])[:200] for r in rows if not r["ok"]})[:5],
        "elapsed_s": elapsed,
        "tok_s": tokens / elapsed if elapsed > 0 else 0.0,
        "events_s": (len(itl) + len(ttft)) / elapsed if elapsed > 0 else 0.0,
        "tokens_per_event": tokens / max(1, len(itl) + len(ttft)),
        "ttft_p50": _percentile(ttft, 0.5),
        "ttft_p99": _percentile(ttft, 0.99),
        "itl_p50": _percentile(itl, 0.5),
        "itl_p99": _percentile(itl, 0.99),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("-c", "--concurrency", type=int, default=8)
    ap.add_argument("-n", "--num-requests", type=int, default=16)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=256)
    a = ap.parse_args()
    print(json.dumps(run_load(a.url, a.concurrency, a.num_requests, a.procs, a.max_tokens)))


if __name__ == "__main__":
    main()
