"""Run load phases: closed loop at a fixed concurrency, or open loop at a Poisson request rate.

A phase stops issuing requests after `num_requests` or `duration_s` (whichever comes first) and
then waits for those in flight. Throughput counts successful requests over the phase's wall time
(first send to last answer).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from deepseek_serve.bench.client import ClientOptions, RequestResult, send
from deepseek_serve.bench.stats import Summary, poisson_arrivals, summarize
from deepseek_serve.bench.workloads import Workload

Mode = Literal["closed", "open"]


@dataclass(frozen=True)
class Phase:
    """`value` is the concurrency (closed loop) or the request rate in requests/s (open loop)."""

    mode: Mode
    value: float
    num_requests: int | None = None
    duration_s: float | None = None

    def __post_init__(self) -> None:
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("a phase needs num_requests or duration_s")
        if self.mode == "closed" and (self.value < 1 or self.value != int(self.value)):
            raise ValueError(f"concurrency must be a whole number >= 1, got {self.value}")
        if self.mode == "open" and self.value <= 0:
            raise ValueError(f"request rate must be > 0, got {self.value}")

    @property
    def label(self) -> str:
        return f"c={int(self.value)}" if self.mode == "closed" else f"rate={self.value:g}/s"


@dataclass
class PhaseResult:
    phase: Phase
    elapsed_s: float
    requests: list[RequestResult]
    server_peak_rss_bytes: int | None = None
    loadavg_before: tuple[float, float, float] | None = None
    loadavg_after: tuple[float, float, float] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.metrics:
            self.metrics = compute_metrics(self.requests, self.elapsed_s)


def compute_metrics(requests: list[RequestResult], elapsed_s: float) -> dict[str, Any]:
    """Throughputs, error counts and latency summaries (seconds) of one phase."""
    ok = [r for r in requests if r.ok]
    errors = Counter(r.status for r in requests if not r.ok)
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in ok)
    wall = elapsed_s if elapsed_s > 0 else float("nan")

    def dist(values: list[float]) -> dict[str, Any] | None:
        summary: Summary | None = summarize(values)
        return summary.to_dict() if summary else None

    return {
        "num_requests": len(requests),
        "num_ok": len(ok),
        "num_errors": len(requests) - len(ok),
        "error_rate": (len(requests) - len(ok)) / len(requests) if requests else 0.0,
        "errors_by_status": dict(sorted(errors.items())),
        "request_throughput": len(ok) / wall,
        "output_token_throughput": output_tokens / wall,
        "total_token_throughput": (output_tokens + prompt_tokens) / wall,
        "output_tokens": output_tokens,
        "prompt_tokens": prompt_tokens,
        "usage_reported": all(r.usage_reported for r in ok) if ok else False,
        "ttft": dist([r.ttft for r in ok if r.ttft is not None]),
        "tpot": dist([t for r in ok if (t := r.tpot) is not None]),
        "itl": dist([gap for r in ok for gap in r.itl]),
        "e2e": dist([r.e2e for r in ok]),
    }


OnResult = Callable[[RequestResult], None]


async def run_phase(
    client: httpx.AsyncClient,
    workload: Workload,
    options: ClientOptions,
    phase: Phase,
    *,
    seed: int = 0,
    first_index: int = 0,
    on_result: OnResult | None = None,
    server_pid: int | None = None,
) -> PhaseResult:
    """Run one phase. Request indexes start at `first_index` so phases of a run do not repeat prompts."""
    loadavg_before = os.getloadavg()
    sampler = _RssSampler(server_pid) if server_pid else None
    if sampler:
        sampler.start()
    start = time.perf_counter()
    deadline = start + phase.duration_s if phase.duration_s is not None else float("inf")
    limit = phase.num_requests if phase.num_requests is not None else 1 << 62
    results: list[RequestResult] = []

    def record(result: RequestResult) -> None:
        results.append(result)
        if on_result:
            on_result(result)

    if phase.mode == "closed":
        next_index = 0

        async def worker() -> None:
            nonlocal next_index
            while next_index < limit and time.perf_counter() < deadline:
                i = next_index
                next_index += 1
                spec = workload.request(first_index + i)
                record(await send(client, spec, options, sent_at=time.perf_counter() - start))

        await asyncio.gather(*(worker() for _ in range(int(phase.value))))
    else:
        tasks: list[asyncio.Task[None]] = []

        async def one(i: int) -> None:
            spec = workload.request(first_index + i)
            record(await send(client, spec, options, sent_at=time.perf_counter() - start))

        for i, at in enumerate(poisson_arrivals(phase.value, seed)):
            if i >= limit or start + at >= deadline:
                break
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    peak = await sampler.stop() if sampler else None
    results.sort(key=lambda r: r.index)
    return PhaseResult(
        phase=phase,
        elapsed_s=elapsed,
        requests=results,
        server_peak_rss_bytes=peak,
        loadavg_before=loadavg_before,
        loadavg_after=os.getloadavg(),
    )


class _RssSampler:
    """Peak resident memory of a local server process, read from /proc every 0.25 s."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    def read(self) -> int:
        try:
            with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def start(self) -> None:
        async def loop() -> None:
            while True:
                self.peak = max(self.peak, self.read())
                await asyncio.sleep(0.25)

        self._task = asyncio.create_task(loop())

    async def stop(self) -> int | None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.peak = max(self.peak, self.read())
        return self.peak or None
