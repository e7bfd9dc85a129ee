"""What the gateway costs: one engine called directly vs the same engine through a gateway, side by side.

    .venv/bin/python bench/gateway_overhead.py [--ttft-requests 60] [--rounds 4] [--requests 16]
                                               [--concurrency 4] [--max-tokens 64] [--threads 1]

Targets (gateway overhead): tokens/s through the gateway >= 0.95x direct; added TTFT p50 < 5 ms.

Two real processes: `deepseek-serve serve --role engine` (SmolLM2-135M-Instruct unless DS_MODEL
is set) and `serve --role gateway` with that engine as its only upstream (SQLite usage records,
in-process limits, response cache off, auth off on loopback). Every request is
`POST /v1/chat/completions`, streamed, temperature 0, with fixed prompts; the engine is called
with its shared secret, the gateway without a key.

1. TTFT: one request at a time, alternating direct, gateway, direct, ... (so machine noise hits
   both alike); `max_tokens=4`; time to the first content chunk. Every request sends the same
   prompt, so the engine's prefix cache holds it (the engine keeps one idle entry for prompts that
   share a prefix: cycling prompts would hand the cache to whichever target came second): each
   request recomputes one prompt token, and the TTFT is one forward step plus the HTTP path, which
   keeps the gateway's share visible on a busy host. Reports medians, their difference
   and the median of the paired differences (request i through the gateway minus request i direct)
   with a 95% bootstrap interval (fixed seed).
2. Throughput: `--rounds` rounds, each running `--requests` requests at `--concurrency` against
   direct then gateway (order flipped every round); `max_tokens` with `ignore_eos`, so every request
   generates the same number of tokens; tokens/s = completion tokens (usage chunk) / round wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson

from common import free_port, wait_ready

PROMPTS = [f"Question {i}: describe the sky over the sea at dawn in a few sentences." for i in range(8)]


def start(role: str, port: int, data_dir: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("DS_") or k == "DS_MODEL"}
    full.setdefault("DS_MODEL", "smollm2-135m-instruct")  # the figures in docs/performance.md
    full.update({"DS_DATA_DIR": str(data_dir), "DS_LOG_LEVEL": "warning", **env})
    data_dir.mkdir(parents=True, exist_ok=True)
    log = (data_dir / "server.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "deepseek_serve", "serve", "--role", role, "--host", "127.0.0.1", "--port", str(port)],
        env=full,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@dataclass
class Target:
    name: str
    url: str
    headers: dict[str, str]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (clock-tick resolution: sum many requests)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds the gateway and the engine spend while requests of one target run."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.spent: dict[tuple[str, str], float] = {}

    def begin(self) -> dict[str, float]:
        return {name: cpu_s(pid) for name, pid in self.pids.items()}

    def end(self, target: str, start: dict[str, float]) -> None:
        for name, pid in self.pids.items():
            key = (target, name)
            self.spent[key] = self.spent.get(key, 0.0) + cpu_s(pid) - start[name]


async def one(
    client: httpx.AsyncClient, target: Target, model: str, prompt: str, max_tokens: int, ignore_eos: bool
) -> tuple[float, int]:
    """(TTFT seconds, completion tokens) of one streamed chat completion."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": ignore_eos,
    }
    sent = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", f"{target.url}/v1/chat/completions", json=body, headers=target.headers) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = orjson.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{target.name}: {chunk['error']}")
            if ttft is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - sent
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    assert ttft is not None, f"{target.name}: no content"
    return ttft, tokens


async def throughput(
    client: httpx.AsyncClient, target: Target, model: str, requests: int, concurrency: int, max_tokens: int
) -> tuple[float, int]:
    """(tokens/s, tokens) of one round."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    total = 0

    async def worker() -> None:
        nonlocal total
        while not queue.empty():
            i = queue.get_nowait()
            _, n = await one(client, target, model, PROMPTS[i % len(PROMPTS)], max_tokens, True)
            total += n

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - started), total


async def run(args: argparse.Namespace, direct: Target, gateway: Target, pids: dict[str, int]) -> None:
    ttft_cpu, tok_cpu = CpuMeter(pids), CpuMeter(pids)
    tokens = {"direct": 0, "gateway": 0}
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64)) as client:
        model = (await client.get(f"{gateway.url}/v1/models")).json()["data"][0]["id"]
        for target in (direct, gateway):  # warm-up: connections, template, first allocations
            for prompt in PROMPTS:
                await one(client, target, model, prompt, 4, False)
        ttfts: dict[str, list[float]] = {"direct": [], "gateway": []}
        for _ in range(args.ttft_requests):
            for target in (direct, gateway):
                start = ttft_cpu.begin()
                ttft, _ = await one(client, target, model, PROMPTS[0], 4, False)
                ttft_cpu.end(target.name, start)
                ttfts[target.name].append(ttft)
        rates: dict[str, list[float]] = {"direct": [], "gateway": []}
        for r in range(args.rounds):
            order = (direct, gateway) if r % 2 == 0 else (gateway, direct)
            for target in order:
                start = tok_cpu.begin()
                rate, n = await throughput(client, target, model, args.requests, args.concurrency, args.max_tokens)
                tok_cpu.end(target.name, start)
                rates[target.name].append(rate)
                tokens[target.name] += n
    d, g = ttfts["direct"], ttfts["gateway"]
    paired = [b - a for a, b in zip(d, g, strict=True)]
    td, tg = sum(rates["direct"]), sum(rates["gateway"])
    print()
    print(
        f"model {model}; {platform.node()}, {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(f"TTFT: {args.ttft_requests} requests per target, one at a time, alternating, one prompt; max_tokens=4")
    print(
        f"throughput: {args.rounds} rounds x {args.requests} requests at concurrency {args.concurrency}, "
        f"max_tokens={args.max_tokens} (ignore_eos)"
    )
    print()
    print("| metric | direct | gateway | gateway vs direct |")
    print("|---|---|---|---|")
    print(
        f"| TTFT p50 (ms) | {statistics.median(d) * 1e3:.2f} | {statistics.median(g) * 1e3:.2f} | "
        f"{(statistics.median(g) - statistics.median(d)) * 1e3:+.2f} ms |"
    )
    lo, hi = bootstrap_median(paired)
    print(
        f"| TTFT paired difference p50 (ms) | | | {statistics.median(paired) * 1e3:+.2f} ms "
        f"(95% CI {lo * 1e3:+.2f} .. {hi * 1e3:+.2f}) |"
    )
    print(f"| TTFT p90 (ms) | {quantile(d, 0.9) * 1e3:.2f} | {quantile(g, 0.9) * 1e3:.2f} | |")
    print(f"| tokens/s (mean of rounds) | {td / args.rounds:.1f} | {tg / args.rounds:.1f} | {tg / td:.3f}x |")
    for r in range(args.rounds):
        a, b = rates["direct"][r], rates["gateway"][r]
        print(f"| tokens/s round {r + 1} | {a:.1f} | {b:.1f} | {b / a:.3f}x |")
    n = args.ttft_requests
    for proc in ("engine", "gateway"):
        a, b = ttft_cpu.spent[("direct", proc)] / n, ttft_cpu.spent[("gateway", proc)] / n
        print(f"| {proc} process CPU per TTFT request (ms) | {a * 1e3:.2f} | {b * 1e3:.2f} | {(b - a) * 1e3:+.2f} ms |")
    for proc in ("engine", "gateway"):
        a = tok_cpu.spent[("direct", proc)] / max(tokens["direct"], 1)
        b = tok_cpu.spent[("gateway", proc)] / max(tokens["gateway"], 1)
        print(f"| {proc} process CPU per token (us) | {a * 1e6:.0f} | {b * 1e6:.0f} | {(b - a) * 1e6:+.0f} us |")


def bootstrap_median(values: list[float], rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(rounds))
    return medians[int(0.025 * rounds)], medians[int(0.975 * rounds) - 1]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ttft-requests", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="the engine's DS_N_THREADS (1: steady on a busy host)")
    args = parser.parse_args()
    secret = uuid.uuid4().hex
    engine_port, gateway_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        root = Path(tmp)
        engine = start(
            "engine",
            engine_port,
            root / "engine",
            {
                "DS_ENGINE_SECRET": secret,
                "DS_MAX_BATCH_SIZE": "8",
                "DS_CONTEXT_LENGTH": "2048",
                "DS_N_THREADS": str(args.threads),
            },
        )
        gateway = None
        try:
            wait_ready(f"http://127.0.0.1:{engine_port}/health/ready", engine, root / "engine" / "server.log")
            gateway = start(
                "gateway",
                gateway_port,
                root / "gateway",
                {
                    "DS_ENGINE_SECRET": secret,
                    "DS_UPSTREAMS": f"http://127.0.0.1:{engine_port}",
                    "DS_RESPONSE_CACHE": "false",
                    "DS_CONTEXT_LENGTH": "2048",
                },
            )
            wait_ready(f"http://127.0.0.1:{gateway_port}/health/ready", gateway, root / "gateway" / "server.log")
            asyncio.run(
                run(
                    args,
                    Target("direct", f"http://127.0.0.1:{engine_port}", {"Authorization": f"Bearer {secret}"}),
                    Target("gateway", f"http://127.0.0.1:{gateway_port}", {}),
                    {"engine": engine.pid, "gateway": gateway.pid},
                )
            )
        finally:
            for proc in (gateway, engine):
                if proc is not None and proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=60)


if __name__ == "__main__":
    main()
