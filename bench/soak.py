"""Mixed-traffic soak against a real `deepseek-serve serve` process: no 5xx, flat memory and descriptors.

For `--duration-s` seconds, `--concurrency` clients each loop over a weighted mix:

- stream:      streamed chat completion with sampling, read to `[DONE]`
- cancel:      streamed chat completion, closed after the first content chunk (the server aborts it)
- json:        non-streamed text completion with sampling
- cache:       deterministic chat (temperature 0) over a few fixed prompts: response-cache hits after
               the first of each
- bad:         a hostile or malformed request from a fixed list (must be a 4xx)
- conversation: create a conversation, one turn in it, read it back, delete it
- light:       /v1/models, /health/ready

Every `--sample-s` the server process's RSS (`/proc/<pid>/status` VmRSS, the process and its
children) and open file descriptors (`/proc/<pid>/fd`) are sampled. After the warm-up (the first
`--warmup-s`), growth = median of the last minute of samples / median of the first minute after
warm-up - 1; target < 5% for both. Any 5xx fails the run.

    .venv/bin/python bench/soak.py [--duration-s 600] [--concurrency 6] \
        [--database-url mysql+asyncmy://root@127.0.0.1:3306/] [--redis-url redis://127.0.0.1:6379/0]

With `--database-url` ending in `/` a fresh database is created there (dropped afterwards); without
it the server uses SQLite in its data directory. Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.server import ServeProcess  # noqa: E402 - the test helper is the one place that starts servers

SEED = 777
MODEL = {"id": ""}  # the served model's id, read from /v1/models at start ("default" in BAD stands for it)
MIX = (("stream", 5), ("cancel", 2), ("json", 3), ("cache", 4), ("bad", 4), ("conversation", 1), ("light", 2))
CACHED_PROMPTS = ("Say hello.", "Name a color.", "Count to three.")
PROMPTS = (
    "Write a limerick about a cat.",
    "Explain TCP in one paragraph.",
    "Give me three dinner ideas.",
    "Why is the sky blue?",
    "Summarize the plot of Hamlet.",
)
# (path, body or raw bytes): each must be refused with a 4xx
BAD: tuple[tuple[str, Any], ...] = (
    ("/v1/chat/completions", b"{not json"),
    ("/v1/chat/completions", {"model": "default", "messages": []}),
    ("/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}),
    ("/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": "x"}], "n": 10_000}),
    (
        "/v1/chat/completions",
        {"model": "default", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
    ),
    ("/v1/chat/completions", {"model": "default", "messages": [{"role": "wizard", "content": "x"}]}),
    ("/v1/chat/completions", {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}),
    (
        "/v1/chat/completions",
        {"model": "default", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10_000_000},
    ),
    ("/v1/completions", {"model": "default", "prompt": [[1, 2, -1]]}),
    ("/v1/completions", {"model": "default", "prompt": [10**12]}),
    ("/v1/completions", {"model": "default", "prompt": "x", "logprobs": 10_000}),
    ("/v1/completions", {"model": "default", "prompt": "x", "stop": ["a"] * 1000}),
)


class Stats:
    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.server_errors: list[str] = []
        self.bad_accepted: list[str] = []

    def note(self, kind: str, status: int | str, detail: str = "") -> None:
        self.outcomes[f"{kind} {status}"] += 1
        if isinstance(status, int) and status >= 500:
            self.server_errors.append(f"{kind} {status} {detail[:300]}")


def chat_body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL["id"], "messages": [{"role": "user", "content": prompt}], **extra}


async def do(kind: str, client: httpx.AsyncClient, rng: random.Random, stats: Stats) -> None:
    if kind in ("stream", "cancel"):
        body = chat_body(rng.choice(PROMPTS), max_tokens=rng.randint(16, 48), temperature=0.9, stream=True)
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                stats.note(kind, resp.status_code, (await resp.aread()).decode(errors="replace"))
                return
            async for line in resp.aiter_lines():
                if kind == "cancel" and '"content"' in line:
                    stats.note(kind, "cancelled")
                    return  # leaving the block closes the connection mid-stream
                if line.startswith('data: {"error"'):
                    stats.note(kind, "stream-error", line)
                    stats.server_errors.append(f"{kind} stream error event {line[:300]}")
                    return
            stats.note(kind, 200)
    elif kind == "json":
        body = {
            "model": MODEL["id"],
            "prompt": rng.choice(PROMPTS),
            "max_tokens": rng.randint(8, 32),
            "temperature": 0.9,
        }
        resp = await client.post("/v1/completions", json=body)
        stats.note(kind, resp.status_code, resp.text)
    elif kind == "cache":
        resp = await client.post(
            "/v1/chat/completions", json=chat_body(rng.choice(CACHED_PROMPTS), max_tokens=16, temperature=0)
        )
        stats.note(f"cache-{resp.headers.get('x-cache', 'none')}", resp.status_code, resp.text)
    elif kind == "bad":
        path, payload = rng.choice(BAD)
        if isinstance(payload, bytes):
            resp = await client.post(path, content=payload, headers={"content-type": "application/json"})
        else:
            if payload.get("model") == "default":
                payload = {**payload, "model": MODEL["id"]}
            resp = await client.post(path, json=payload)
        stats.note(kind, resp.status_code, resp.text)
        if resp.status_code < 400:
            stats.bad_accepted.append(f"{path} {str(payload)[:120]} -> {resp.status_code}")
    elif kind == "conversation":
        created = await client.post("/v1/conversations", json={"title": "soak"})
        stats.note("conv-create", created.status_code, created.text)
        if created.status_code != 200:
            return
        conv = created.json()["id"]
        turn = await client.post(
            "/v1/chat/completions", json=chat_body("Hi!", max_tokens=12, temperature=0.9, conversation_id=conv)
        )
        stats.note("conv-turn", turn.status_code, turn.text)
        got = await client.get(f"/v1/conversations/{conv}/messages")
        stats.note("conv-read", got.status_code, got.text)
        deleted = await client.delete(f"/v1/conversations/{conv}")
        stats.note("conv-delete", deleted.status_code, deleted.text)
    else:
        for path in ("/v1/models", "/health/ready"):
            resp = await client.get(path)
            stats.note(f"light{path}", resp.status_code, resp.text)


async def client_loop(url: str, key: str, deadline: float, seed: int, stats: Stats) -> None:
    rng = random.Random(seed)
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            try:
                await do(kind, client, rng, stats)
            except httpx.HTTPError as exc:
                stats.note(kind, type(exc).__name__)


def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        todo.extend(int(c) for c in children)
    return pids


def sample(pid: int) -> tuple[float, int]:
    """(RSS in MiB, open fds) of the process and its children."""
    rss_kib, fds = 0, 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss_kib += int(line.split()[1])
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            continue
    return rss_kib / 1024, fds


async def sampler(pid: int, start: float, deadline: float, every_s: float, out: list[tuple[float, float, int]]) -> None:
    while time.monotonic() < deadline:
        rss, fds = sample(pid)
        out.append((time.monotonic() - start, rss, fds))
        await asyncio.sleep(every_s)


async def admin(database_root: str, statement: str) -> None:
    engine = create_async_engine(database_root)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(statement))
    finally:
        await engine.dispose()


def growth(
    samples: list[tuple[float, float, int]], warmup_s: float, column: int, window_s: float
) -> tuple[float, float]:
    after = [s for s in samples if s[0] >= warmup_s]
    first = [s[column] for s in after if s[0] < warmup_s + window_s]
    last_t = after[-1][0] if after else 0.0
    last = [s[column] for s in after if s[0] > last_t - window_s]
    if not first or not last:
        return float("nan"), float("nan")
    return statistics.median(first), statistics.median(last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--warmup-s", type=float, default=120.0)
    parser.add_argument("--window-s", type=float, default=60.0, help="first/last window compared for growth")
    parser.add_argument("--sample-s", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--threads", default="1")
    args = parser.parse_args()

    created_db = ""
    database_url = args.database_url
    if database_url.endswith("/"):
        created_db = f"ds_bench_soak_{uuid.uuid4().hex[:8]}"
        asyncio.run(admin(database_url, f"CREATE DATABASE `{created_db}` CHARACTER SET utf8mb4"))
        database_url += created_db
    admin_key = f"sk-soakadmin{uuid.uuid4().hex}"
    env = {
        "DS_AUTH": "on",
        "DS_ADMIN_KEY": admin_key,
        "DS_N_THREADS": args.threads,
        "DS_LOG_LEVEL": "warning",
        "DS_MAX_BATCH_SIZE": "4",
        "DS_MAX_QUEUE_SIZE": "64",
    }
    if database_url:
        env |= {"DS_DATABASE_URL": database_url, "DS_DB_AUTO_MIGRATE": "true"}
    if args.redis_url:
        env |= {"DS_REDIS_URL": args.redis_url, "DS_REDIS_KEY_PREFIX": f"bench-soak-{uuid.uuid4().hex[:8]}:"}
    stats = Stats()
    samples: list[tuple[float, float, int]] = []
    try:
        with TemporaryDirectory(prefix="ds-soak-") as tmp, ServeProcess(Path(tmp), timeout_s=300, **env) as server:
            assert server.proc is not None
            key = httpx.post(
                f"{server.url}/admin/keys",
                headers={"Authorization": f"Bearer {admin_key}"},
                json={"name": "soak"},
                timeout=30,
            ).json()["key"]
            models = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
            MODEL["id"] = models.json()["data"][0]["id"]

            async def run() -> None:
                assert server.proc is not None
                start = time.monotonic()
                deadline = start + args.duration_s
                await asyncio.gather(
                    sampler(server.proc.pid, start, deadline, args.sample_s, samples),
                    *(client_loop(server.url, key, deadline, SEED + i, stats) for i in range(args.concurrency)),
                )

            asyncio.run(run())
            alive = server.proc.poll() is None
    finally:
        if created_db:
            asyncio.run(admin(args.database_url, f"DROP DATABASE IF EXISTS `{created_db}`"))

    rss0, rss1 = growth(samples, args.warmup_s, 1, args.window_s)
    fd0, fd1 = growth(samples, args.warmup_s, 2, args.window_s)
    rss_growth, fd_growth = rss1 / rss0 - 1, fd1 / fd0 - 1
    total = sum(stats.outcomes.values())
    print(f"\nmachine: {platform.node()} ({os.cpu_count()} cpus, shared), python {platform.python_version()}")
    print(
        f"duration {args.duration_s:.0f}s, warm-up {args.warmup_s:.0f}s, windows {args.window_s:.0f}s, "
        f"concurrency {args.concurrency}, database: {'MariaDB' if database_url else 'SQLite'}, "
        f"redis: {'yes' if args.redis_url else 'no (in-process cache)'}"
    )
    print(f"{'outcome':34}{'count':>8}")
    for name, count in sorted(stats.outcomes.items()):
        print(f"{name:34}{count:>8}")
    print(f"{'total':34}{total:>8}")
    print(f"\n{'':22}{'after warm-up':>14}{'end':>10}{'growth':>10}")
    print(f"{'RSS (MiB)':22}{rss0:>14.1f}{rss1:>10.1f}{rss_growth:>10.1%}")
    print(f"{'open fds':22}{fd0:>14.0f}{fd1:>10.0f}{fd_growth:>10.1%}")
    print(f"{'server errors (5xx)':22}{len(stats.server_errors):>14}")
    print(f"{'bad requests accepted':22}{len(stats.bad_accepted):>14}")
    print(f"{'server alive at end':22}{alive!s:>14}")
    for line in stats.server_errors[:10] + stats.bad_accepted[:10]:
        print("  ", line)
    ok = alive and not stats.server_errors and rss_growth < 0.05 and fd_growth < 0.05
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
