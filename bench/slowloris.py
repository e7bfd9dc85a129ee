"""Slowloris: latency of normal requests while 200 half-open connections hold the server, vs none.

One `deepseek-serve serve` process (defaults of api/http_protocol.py: 10 s to send the headers,
15 s idle). An attacker process keeps `--conns` connections open, each sending a request line and
then one more header line every `--interval` seconds, never the blank line; when the server cuts
one (408 at the header deadline) it opens another at once, so the pressure never stops. Meanwhile
this process sends normal requests one at a time over a keep-alive connection, for `--phase-s`
seconds per phase: rounds of ten `GET /v1/models` (HTTP path only) and one greedy 4-token chat
completion. Phases alternate none / attack / none / attack, so slow drift of a shared machine hits
both conditions alike; an attack phase outlasts the header deadline, so connections are cut and
replaced while measuring.

    .venv/bin/python bench/slowloris.py [--conns 200] [--phase-s 30] [--rounds 2] [--interval 2]
                                        [--model smollm2-135m-instruct]

Prints a table (p50, p99 per request kind and condition, attack / none ratios) and the attacker's
counts (connections opened, 408s received, connections open on average while measuring).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from multiprocessing.synchronize import Event
from typing import Any

import httpx
import numpy as np

from common import free_port


# --- the attacker (its own process, so its work does not share this process's GIL) ------------------
async def _attack(port: int, conns: int, interval: float, ready: Event, stop: Event, stats: dict[str, int]) -> None:
    open_now = 0
    all_open = asyncio.Event()

    async def hold() -> None:
        nonlocal open_now
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                stats["connect_errors"] += 1
                await asyncio.sleep(0.1)
                continue
            stats["opened"] += 1
            open_now += 1
            if open_now >= conns:
                all_open.set()
            closed = asyncio.ensure_future(reader.read())
            try:
                writer.write(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                while not stop.is_set():
                    await asyncio.wait([closed], timeout=interval)
                    if closed.done():
                        break
                    writer.write(b"X-Slow: 1\r\n")
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                open_now -= 1
                if (
                    closed.done()
                    and not closed.cancelled()
                    and closed.exception() is None
                    and closed.result().startswith(b"HTTP/1.1 408")
                ):
                    stats["got_408"] += 1
                closed.cancel()
                writer.close()

    tasks = [asyncio.ensure_future(hold()) for _ in range(conns)]
    await all_open.wait()
    ready.set()
    samples = []
    while not stop.is_set():
        samples.append(open_now)
        await asyncio.sleep(0.1)
    stats["open_avg"] = int(sum(samples) / max(len(samples), 1))
    stats["open_min"] = min(samples, default=0)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _attacker(port: int, conns: int, interval: float, ready: Event, stop: Event, out: Any) -> None:
    stats = {"opened": 0, "got_408": 0, "connect_errors": 0, "open_avg": 0, "open_min": 0}
    asyncio.run(_attack(port, conns, interval, ready, stop, stats))
    out.put(stats)


# --- normal requests --------------------------------------------------------------------------------
def _measure(client: httpx.Client, model: str, seconds: float, tag: int) -> dict[str, list[float]]:
    """For `seconds`: rounds of 10 `GET /v1/models` and one 4-token chat completion, one at a time."""
    out: dict[str, list[float]] = {"GET /v1/models": [], "chat, 4 tokens": []}
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        for _ in range(10):
            t0 = time.perf_counter()
            assert client.get("/v1/models").status_code == 200
            out["GET /v1/models"].append(time.perf_counter() - t0)
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"Say hi to robot {tag}-{i}."}],
            "max_tokens": 4,
            "temperature": 0,
            "ignore_eos": True,
        }
        t0 = time.perf_counter()
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        out["chat, 4 tokens"].append(time.perf_counter() - t0)
        i += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conns", type=int, default=200, help="half-open connections during the attack")
    ap.add_argument("--phase-s", type=float, default=30.0, help="seconds per phase (> the 10 s header deadline)")
    ap.add_argument("--interval", type=float, default=2.0, help="seconds between two header lines")
    ap.add_argument("--rounds", type=int, default=2, help="none/attack pairs")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="DS_MODEL of the server")
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DS_")}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    results: dict[str, dict[str, list[float]]] = {"none": {}, "attack": {}}
    attack_stats: list[dict[str, int]] = []
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        env.update(
            {
                "DS_DATA_DIR": tmp,
                "DS_RESPONSE_CACHE": "false",
                "DS_LOG_LEVEL": "error",
                "DS_AUTH": "off",
                "DS_MODEL": args.model,
                "DS_N_THREADS": "1",
                "DS_MAX_BATCH_SIZE": "4",
            }
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "deepseek_serve", "serve", "--port", str(port)], env=env, cwd=tmp
        )
        try:
            while True:
                try:
                    if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.3)
            with httpx.Client(base_url=url, timeout=120) as client:
                model = client.get("/v1/models").json()["data"][0]["id"]
                _measure(client, model, 5.0, -1)  # warm-up
                for r in range(args.rounds):
                    for condition in ("none", "attack"):
                        attacker = None
                        if condition == "attack":
                            ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
                            attacker = ctx.Process(
                                target=_attacker, args=(port, args.conns, args.interval, ready, stop, out)
                            )
                            attacker.start()
                            assert ready.wait(60), "the attacker could not open its connections"
                        # a fresh connection per phase, opened while the attack is on
                        client.close()
                        client = httpx.Client(base_url=url, timeout=120)
                        got = _measure(client, model, args.phase_s, r)
                        if attacker is not None:
                            stop.set()
                            attack_stats.append(out.get(timeout=60))
                            attacker.join(30)
                        for kind, values in got.items():
                            results[condition].setdefault(kind, []).extend(values)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(
        f"{args.conns} half-open connections (a header line every {args.interval:g} s), "
        f"{args.rounds} none/attack pairs, requests one at a time"
    )
    print("| request | n per condition | p50 none | p50 attack | p99 none | p99 attack | p50 ratio | p99 ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind in results["none"]:
        none = np.array(results["none"][kind]) * 1000
        hit = np.array(results["attack"][kind]) * 1000
        p50n, p99n, p50a, p99a = (
            np.percentile(none, 50),
            np.percentile(none, 99),
            np.percentile(hit, 50),
            np.percentile(hit, 99),
        )
        print(
            f"| {kind} | {len(none)} | {p50n:.2f} ms | {p50a:.2f} ms | {p99n:.2f} ms | {p99a:.2f} ms "
            f"| {p50a / p50n:.3f}x | {p99a / p99n:.3f}x |"
        )
    for i, stats in enumerate(attack_stats):
        print(
            f"attack phase {i + 1}: opened {stats['opened']} connections, {stats['got_408']} cut with 408, "
            f"open on average {stats['open_avg']} (min {stats['open_min']}), "
            f"connect errors {stats['connect_errors']}"
        )


if __name__ == "__main__":
    main()
