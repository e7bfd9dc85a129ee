"""What auth and usage accounting add to a one-token chat completion (target: at most 5 ms on the median).

    .venv/bin/python bench/storage_overhead.py [--requests 200] [--models-requests 1000]
                                               [--backend mariadb|sqlite]

Two real server processes (Uvicorn, the same app and model) run side by side:
  - with:    DS_AUTH=on, every request carries an API key (checked against the database, cached),
             and every response records a usage row (batched writer) in MariaDB or SQLite;
  - without: DS_AUTH=off and the usage and conversation slots emptied after `build_services`.
Requests alternate between the two (with, without, with, ...), one at a time, so machine noise hits
both alike. Each is `POST /v1/chat/completions` with max_tokens=1, temperature 0, a fixed prompt
(prompt `i % 8` of a fixed list); then `GET /v1/models` the same way (auth without the model's noise).
Also timed in-process: one cached key check, one `record()`, one background flush. Prints a Markdown
table: medians, their difference, and the median of the paired differences (request i with minus
request i without) with a 95% bootstrap interval (fixed seed).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
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
from pathlib import Path
from typing import Any

import httpx

from common import free_port, wait_ready

PROMPTS = [f"Reply with one word. Question {i}: what colour is the sky?" for i in range(8)]


def serve(mode: str, port: int) -> None:
    """Child process: the app under Uvicorn; `without` strips the storage slots from the services."""
    import uvicorn

    from deepseek_serve.api import app as app_module
    from deepseek_serve.config import load_settings

    if mode == "without":
        original = app_module.build_services

        async def stripped(settings: Any, engine: Any) -> Any:
            services = await original(settings, engine)
            services.auth = services.usage = services.conversations = None
            return services

        app_module.build_services = stripped
    uvicorn.run(
        app_module.create_app(load_settings()),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        loop="uvloop",
        http="httptools",
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bootstrap_median(values: list[float], rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the median (fixed seed)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(rounds))
    return medians[int(0.025 * rounds)], medians[int(0.975 * rounds)]


async def components(data_dir: Path, url: str) -> dict[str, float]:
    """In-process, on the benchmark's database: µs per cached key check and per usage record(), and ms
    of one background flush of a single record (at low QPS each flush carries about one)."""
    from deepseek_serve.config import load_settings
    from deepseek_serve.contracts import UsageEvent
    from deepseek_serve.storage import Storage

    settings = load_settings(_env_file=None, data_dir=data_dir, database_url=url, usage_flush_interval_s=3600)
    storage = Storage(settings)
    await storage.start(migrate_schema=True)
    key = (await storage.keys.create("bench")).secret
    await storage.key_lookup.check(key)
    n = 20_000
    t0 = time.perf_counter()
    for _ in range(n):
        await storage.key_lookup.check(key)
    check_us = (time.perf_counter() - t0) / n * 1e6
    event = UsageEvent(
        request_id="x",
        key_id=1,
        model="m",
        endpoint="chat.completions",
        status=200,
        finish_reason="length",
        prompt_tokens=20,
        completion_tokens=1,
        created_at=time.time(),
    )
    t0 = time.perf_counter()
    for _ in range(n):
        storage.writer.record(event)
    record_us = (time.perf_counter() - t0) / n * 1e6
    storage.writer._queue.clear()
    flushes = []
    for i in range(200):
        storage.writer.record(dataclasses.replace(event, request_id=f"bench-flush-{uuid.uuid4().hex}-{i}"))
        t0 = time.perf_counter()
        await storage.writer.flush()
        flushes.append((time.perf_counter() - t0) * 1000)
    await storage.close()
    return {"check_us": check_us, "record_us": record_us, "flush_ms": statistics.median(flushes)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200, help="timed requests per variant")
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--models-requests", type=int, default=1000, help="timed GET /v1/models per variant")
    parser.add_argument("--backend", choices=("mariadb", "sqlite"), default="mariadb")
    parser.add_argument("--serve", nargs=2, metavar=("MODE", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return

    tmp = Path(tempfile.mkdtemp(prefix="ds-bench-storage-"))
    db_name = f"ds_bench_storage_{uuid.uuid4().hex[:8]}"
    if args.backend == "mariadb":
        subprocess.run(
            ["mysql", "-uroot", "-h127.0.0.1", "-e", f"CREATE DATABASE {db_name} CHARACTER SET utf8mb4"], check=True
        )
        url = f"mysql+asyncmy://root@127.0.0.1:3306/{db_name}"
    else:
        url = f"sqlite+aiosqlite:///{tmp / 'bench.db'}"
    admin_key = "sk-" + uuid.uuid4().hex + uuid.uuid4().hex[:16]
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("DS_")}
    base_env.update(
        {
            "DS_DATABASE_URL": url,
            "DS_DB_AUTO_MIGRATE": "true",
            "DS_ADMIN_KEY": admin_key,
            "DS_REDIS_URL": "",
            "DS_RESPONSE_CACHE": "false",
            "DS_N_THREADS": "1",
            "DS_MAX_BATCH_SIZE": "4",
            "DS_CONTEXT_LENGTH": "2048",
            "DS_LOG_LEVEL": "warning",
        }
    )
    procs: dict[str, subprocess.Popen[bytes]] = {}
    urls: dict[str, str] = {}
    try:
        for mode in ("with", "without"):
            port = free_port()
            env = {**base_env, "DS_DATA_DIR": str(tmp / mode), "DS_AUTH": "on" if mode == "with" else "off"}
            procs[mode] = subprocess.Popen(
                [sys.executable, __file__, "--serve", mode, str(port)], env=env, start_new_session=True
            )
            urls[mode] = f"http://127.0.0.1:{port}"
            wait_ready(f"{urls[mode]}/health/ready", procs[mode])  # one at a time: both load the model
        headers = {"with": {"Authorization": f"Bearer {admin_key}"}, "without": {}}
        model = httpx.get(f"{urls['with']}/v1/models", headers=headers["with"]).json()["data"][0]["id"]
        times: dict[str, list[float]] = {"with": [], "without": []}
        with httpx.Client(timeout=60) as client:
            for i in range(args.warmup + args.requests):
                for mode in ("with", "without") if i % 2 == 0 else ("without", "with"):
                    body = {
                        "model": model,
                        "max_tokens": 1,
                        "temperature": 0,
                        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    }
                    t0 = time.perf_counter()
                    response = client.post(f"{urls[mode]}/v1/chat/completions", json=body, headers=headers[mode])
                    elapsed = (time.perf_counter() - t0) * 1000
                    response.raise_for_status()
                    if i >= args.warmup:
                        times[mode].append(elapsed)
            models: dict[str, list[float]] = {"with": [], "without": []}
            for i in range(args.models_requests):
                for mode in ("with", "without") if i % 2 == 0 else ("without", "with"):
                    t0 = time.perf_counter()
                    client.get(f"{urls[mode]}/v1/models", headers=headers[mode]).raise_for_status()
                    models[mode].append((time.perf_counter() - t0) * 1000)
        comp = asyncio.run(components(tmp / "components", url))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
        if args.backend == "mariadb":
            subprocess.run(["mysql", "-uroot", "-h127.0.0.1", "-e", f"DROP DATABASE IF EXISTS {db_name}"])

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"load average {os.getloadavg()[0]:.1f} at the end; backend {args.backend}\n"
    )
    print(
        "| request | n per variant | median without | median with | added (medians) "
        "| added (median of paired differences) [95% interval] | ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, data in (("chat completion, max_tokens=1", times), ("GET /v1/models", models)):
        med = {m: statistics.median(v) for m, v in data.items()}
        paired = [w - o for w, o in zip(data["with"], data["without"], strict=True)]
        low, high = bootstrap_median(paired)
        print(
            f"| {label} | {len(paired)} | {med['without']:.2f} ms | {med['with']:.2f} ms "
            f"| {med['with'] - med['without']:+.2f} ms | {statistics.median(paired):+.2f} ms "
            f"[{low:+.2f} .. {high:+.2f}] | {med['with'] / med['without']:.3f}x |"
        )
    print(
        f"\nin-process ({args.backend}): cached key check {comp['check_us']:.1f} µs, usage record() "
        f"{comp['record_us']:.1f} µs, one background flush of one record {comp['flush_ms']:.2f} ms "
        "(median)"
    )


if __name__ == "__main__":
    main()
