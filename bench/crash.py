"""Crash recovery: `kill -9` of the server under load, restarted the way the deployment restarts it.

compose runs the app with `restart: unless-stopped` (Docker restarts an exited container at once, then
backs off from 100 ms) and the container's healthcheck waits for `/health/ready`; a venv install
under systemd would use `Restart=always` (default `RestartSec=100ms`). Neither Docker nor systemd runs
here, so this script plays that part: it SIGKILLs the server's process group while clients keep
sending, waits `--restart-delay-s` (default 0.1 s, the policies' first delay), starts the same command
on the same port, data directory and database, and times the way back to `/health/ready` = 200.

Clients (`--concurrency`, non-streamed and streamed chat completions with sampling, so no response
cache) record the completion id of every request that they saw succeed (HTTP 200 with a whole body;
for a stream, `[DONE]` received). At the end the server is stopped gracefully and the usage table is
read: every id a client saw succeed must have its row (the usage record's `request_id`).

    .venv/bin/python bench/crash.py [--kills 3] [--load-s 12] [--concurrency 4] \
        [--database-url mysql+asyncmy://root@127.0.0.1:3306/] [--redis-url redis://127.0.0.1:6379/0]

With `--database-url` ending in `/` a fresh database is created there (and dropped afterwards);
without it the server uses SQLite in its data directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.server import ServeProcess  # noqa: E402 - the test helper is the one place that starts servers

SEED = 4321
PROMPTS = (
    "Write a short poem about rivers.",
    "Explain recursion to a child.",
    "List three facts about the moon.",
    "What is a good name for a cat? Explain.",
    "Describe the smell of rain.",
)


@dataclass
class Tally:
    succeeded: set[str] = field(default_factory=set)
    failed: int = 0
    statuses: dict[str, int] = field(default_factory=dict)

    def count(self, label: str) -> None:
        self.statuses[label] = self.statuses.get(label, 0) + 1


async def one_request(client: httpx.AsyncClient, key: str, model: str, rng: random.Random, tally: Tally) -> None:
    stream = rng.random() < 0.5
    body = {
        "model": model,
        "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
        "max_tokens": rng.randint(8, 32),
        "temperature": 0.8,
        "stream": stream,
    }
    headers = {"Authorization": f"Bearer {key}"}
    try:
        if not stream:
            resp = await client.post("/v1/chat/completions", json=body, headers=headers)
            tally.count(str(resp.status_code))
            if resp.status_code == 200:
                tally.succeeded.add(resp.json()["id"])
            else:
                tally.failed += 1
            return
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
            tally.count(f"{resp.status_code} stream")
            completion_id, done = None, False
            async for line in resp.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: ") and completion_id is None and '"id"' in line:
                    completion_id = json.loads(line[6:]).get("id")
            if resp.status_code == 200 and done and completion_id:
                tally.succeeded.add(completion_id)
            else:
                tally.failed += 1
    except httpx.HTTPError as exc:
        tally.count(type(exc).__name__)
        tally.failed += 1
        await asyncio.sleep(0.05)  # the server is down: do not spin


async def client_loop(url: str, key: str, model: str, stop_at: list[float], seed: int, tally: Tally) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120.0, connect=2.0)) as client:
        while time.monotonic() < stop_at[0]:
            await one_request(client, key, model, rng, tally)


def kill_and_restart(server: ServeProcess, delay_s: float) -> tuple[ServeProcess, float]:
    """SIGKILL the server's process group, start the same command on the same port after `delay_s`;
    returns the new server and the seconds from the kill to /health/ready = 200."""
    server.kill()
    killed = time.monotonic()
    time.sleep(delay_s)
    restarted = server.restarted()
    restarted.poll_s = 0.05
    restarted.start()
    return restarted, time.monotonic() - killed


async def count_rows(database_url: str, ids: set[str]) -> tuple[int, int]:
    """(rows in usage_records, ids of `ids` with a row)."""
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            stored = {r[0] for r in await conn.execute(text("SELECT request_id FROM usage_records"))}
    finally:
        await engine.dispose()
    return len(stored), len(ids & stored)


async def admin(database_root: str, statement: str) -> None:
    engine = create_async_engine(database_root)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(statement))
    finally:
        await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--load-s", type=float, default=12.0, help="load before each kill and after the last")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--restart-delay-s", type=float, default=0.1)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--threads", default="1")
    parser.add_argument("--keep-dir", default="", help="data directory to use and keep (default: a temporary one)")
    args = parser.parse_args()

    created_db = ""
    database_url = args.database_url
    if database_url.endswith("/"):
        created_db = f"ds_bench_crash_{uuid.uuid4().hex[:8]}"
        asyncio.run(admin(database_url, f"CREATE DATABASE `{created_db}` CHARACTER SET utf8mb4"))
        database_url += created_db
    admin_key = f"sk-crashadmin{uuid.uuid4().hex}"
    with TemporaryDirectory(prefix="ds-crash-") as tmp:
        data_dir = Path(args.keep_dir or tmp)
        env = {
            "DS_AUTH": "on",
            "DS_ADMIN_KEY": admin_key,
            "DS_N_THREADS": args.threads,
            "DS_LOG_LEVEL": "warning",
            "DS_MAX_BATCH_SIZE": "4",
        }
        if database_url:
            env |= {"DS_DATABASE_URL": database_url, "DS_DB_AUTO_MIGRATE": "true"}
        if args.redis_url:
            env |= {"DS_REDIS_URL": args.redis_url, "DS_REDIS_KEY_PREFIX": f"bench-crash-{uuid.uuid4().hex[:8]}:"}
        server = ServeProcess(data_dir, timeout_s=300, **env)
        url = server.url
        db_url = database_url or f"sqlite+aiosqlite:///{data_dir / 'deepseek.db'}"
        server.__enter__()
        try:
            key = httpx.post(
                f"{url}/admin/keys",
                headers={"Authorization": f"Bearer {admin_key}"},
                json={"name": "crash-load"},
                timeout=30,
            ).json()["key"]
            model = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
            model = model["data"][0]["id"]
            tally = Tally()
            recoveries: list[float] = []
            in_flight_at_kill: list[int] = []

            async def run() -> None:
                stop_at = [float("inf")]
                clients = [
                    asyncio.create_task(client_loop(url, key, model, stop_at, SEED + i, tally))
                    for i in range(args.concurrency)
                ]
                nonlocal server
                for _ in range(args.kills):
                    await asyncio.sleep(args.load_s)
                    async with httpx.AsyncClient(timeout=5) as probe:
                        ready = (await probe.get(f"{url}/health/ready")).json()
                    in_flight_at_kill.append(int(ready["num_running"]) + int(ready["num_waiting"]))
                    server, seconds = await asyncio.to_thread(kill_and_restart, server, args.restart_delay_s)
                    recoveries.append(seconds)
                await asyncio.sleep(args.load_s)
                stop_at[0] = 0.0
                await asyncio.gather(*clients)

            asyncio.run(run())
        finally:
            server.__exit__()  # SIGTERM: a graceful stop flushes queued usage records
        total_rows, found = asyncio.run(count_rows(db_url, tally.succeeded))
        if created_db:
            asyncio.run(admin(args.database_url, f"DROP DATABASE IF EXISTS `{created_db}`"))

    lost = len(tally.succeeded) - found
    print(f"\nmachine: {platform.node()} ({os.cpu_count()} cpus, shared), python {platform.python_version()}")
    print(
        f"kills: {args.kills}, load {args.load_s:.0f}s before each and after the last, "
        f"concurrency {args.concurrency}, restart delay {args.restart_delay_s}s, "
        f"database: {'MariaDB' if 'mysql' in db_url else 'SQLite'}"
    )
    print(f"{'':32}{'value':>12}")
    for i, seconds in enumerate(recoveries, 1):
        print(f"{f'kill {i}: in flight at kill':32}{in_flight_at_kill[i - 1]:>12}")
        print(f"{f'kill {i}: kill -> ready (s)':32}{seconds:>12.2f}")
    if recoveries:
        print(f"{'median kill -> ready (s)':32}{statistics.median(recoveries):>12.2f}")
    print(f"{'requests seen succeeding':32}{len(tally.succeeded):>12}")
    print(f"{'requests seen failing':32}{tally.failed:>12}")
    print(f"{'usage rows in the database':32}{total_rows:>12}")
    print(f"{'successes without a usage row':32}{lost:>12}")
    print("client outcomes:", dict(sorted(tally.statuses.items())))
    sys.exit(1 if lost else 0)


if __name__ == "__main__":
    main()
