"""Time of one `/metrics` scrape (`PrometheusMetrics.render()`, what the route returns) with 10k
requests recorded, in one process and in multiprocess mode (several Uvicorn workers).

    .venv/bin/python bench/metrics_scrape.py [--requests 10000] [--scrapes 200] [--workers 4] [--no-engine]

Each recorded request observes the four latency histograms (16 inter-token gaps each), the token
histograms, a finish reason, an HTTP request on one of 8 (method, route template) pairs with one of
5 statuses, and every 10th a rejection and a response-cache lookup; timings come from `random.Random(0)`.
The real engine (default model) is attached, so its stats are read at every scrape as in the server.
Prints a Markdown table: median and p95 scrape time, exposition size, ratio to an empty registry.
In multiprocess mode a scrape merges the workers' files with prometheus_client's MultiProcessCollector.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

# (method, route template) pairs a server really sees
ROUTES = (
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("GET", "/health/ready"),
    ("GET", "/metrics"),
    ("GET", "<unmatched>"),
    ("POST", "<unmatched>"),
)
STATUSES = (200, 200, 200, 200, 400, 404, 429, 500)
FINISH = ("stop", "length", "stop", "abort", "timeout")
REJECT = ("queue_full", "rate_limited", "timeout", "auth")


def make_metrics(with_engine: bool) -> Any:
    from deepseek_serve.observability.metrics import PrometheusMetrics

    metrics = PrometheusMetrics(sample_interval_s=3600.0)
    if with_engine:
        from deepseek_serve.config import load_settings
        from deepseek_serve.engine.async_engine import AsyncEngine

        engine = AsyncEngine.from_settings(load_settings(_env_file=None, n_threads=1))
        metrics.attach(engine)
    return metrics


def record(metrics: Any, n: int, seed: int) -> None:
    rng = random.Random(seed)
    for i in range(n):
        ttft = rng.lognormvariate(-1.5, 0.8)
        itl = [rng.lognormvariate(-4.0, 0.5) for _ in range(16)]
        metrics.observe_request(
            endpoint="chat.completions",
            finish_reason=rng.choice(FINISH),
            prompt_tokens=rng.randint(8, 2048),
            completion_tokens=rng.randint(1, 512),
            cached_tokens=0,
            queue_s=rng.expovariate(20.0),
            ttft_s=ttft,
            e2e_s=ttft + sum(itl),
            itl_s=itl,
        )
        method, route = rng.choice(ROUTES)
        metrics.observe_http(method, route, rng.choice(STATUSES), rng.lognormvariate(-1.0, 1.0))
        if i % 10 == 0:
            metrics.rejected(rng.choice(REJECT))
            metrics.response_cache(rng.random() < 0.3)


def time_scrapes(metrics: Any, scrapes: int) -> dict[str, float]:
    metrics.render()  # warm-up
    times = []
    body = b""
    for _ in range(scrapes):
        start = time.perf_counter()
        body, _ = metrics.render()
        times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p95_ms": times[int(0.95 * (len(times) - 1))],
        "bytes": len(body),
        "lines": body.count(b"\n"),
    }


def run_role(args: argparse.Namespace) -> None:
    metrics = make_metrics(not args.no_engine)
    if args.role == "single":
        empty = time_scrapes(metrics, args.scrapes)
        record(metrics, args.requests, seed=0)
        full = time_scrapes(metrics, args.scrapes)
        print(json.dumps({"empty": empty, "full": full}))
    elif args.role == "worker":
        record(metrics, args.requests, seed=args.seed)
        metrics.sample()
    elif args.role == "scraper":
        print(json.dumps(time_scrapes(metrics, args.scrapes)))


def child(args: argparse.Namespace, role: str, env: dict[str, str], **extra: Any) -> str:
    cmd = [sys.executable, __file__, "--role", role, "--scrapes", str(args.scrapes)]
    for key, value in extra.items():
        cmd += [f"--{key}", str(value)]
    if args.no_engine or role.endswith("scraper"):
        cmd.append("--no-engine")
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--no-engine", action="store_true", help="do not attach the real engine")
    parser.add_argument("--role", choices=("single", "worker", "scraper"), help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        run_role(args)
        return

    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    single = json.loads(child(args, "single", env, requests=args.requests))
    with tempfile.TemporaryDirectory() as mp_dir:
        mp_env = {**env, "PROMETHEUS_MULTIPROC_DIR": mp_dir}
        mp_empty = json.loads(child(args, "scraper", mp_env))
        per_worker = args.requests // args.workers
        no_engine = ["--no-engine"] if args.no_engine else []
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--role",
                    "worker",
                    "--requests",
                    str(per_worker),
                    "--seed",
                    str(w),
                    *no_engine,
                ],
                env=mp_env,
            )
            for w in range(args.workers)
        ]
        for p in procs:
            if p.wait() != 0:
                raise SystemExit("a worker failed")
        mp_full = json.loads(child(args, "scraper", mp_env))
        files = len(os.listdir(mp_dir))

    mp = f"multiprocess, {args.workers} workers ({files} files)"
    rows = [
        ("one process", 0, single["empty"], single["empty"]),
        ("one process", args.requests, single["full"], single["empty"]),
        (f"{mp}", 0, mp_empty, mp_empty),
        (f"{mp}", args.requests, mp_full, mp_empty),
    ]
    print(
        f"# /metrics scrape time ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{args.scrapes} scrapes each, engine attached: {not args.no_engine})\n"
    )
    print("| mode | requests recorded | exposition lines | bytes | median ms | p95 ms | median vs empty |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, n, r, base in rows:
        print(
            f"| {mode} | {n} | {r['lines']} | {r['bytes']} | {r['median_ms']:.2f} | {r['p95_ms']:.2f} | "
            f"{r['median_ms'] / base['median_ms']:.2f}x |"
        )
    worst = max(single["full"]["p95_ms"], mp_full["p95_ms"])
    print(
        f"\ntarget: under 50 ms with {args.requests} requests recorded; worst p95 {worst:.2f} ms "
        f"({'met' if worst < 50 else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
