"""How many SSE events the API process sustains, measured on CPU: the real server on the torch runner
with a tiny random-weight model (2 layers, hidden 64, deepseek-coder's tokenizer), which decodes
thousands of tokens per second at batch 64, so the API path, not the model, sets the pace (as on a
GPU at 64+ streams). Runs `serve` once per code tree named with --src (e.g. the main checkout's src/
and this one's), alternating, and loads each with bench/sse_load.py.

    PYTHONPATH=src python bench/api_path_cpu.py --src before=/work/main/src --src after=src --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sse_load  # bench/sse_load.py
from common import free_port, wait_ready

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.torch_models import CODER, tiny_checkpoint


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) per thread name of process `pid` (threads of one name summed)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        name = "loop" if task.name == str(pid) else name
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", action="append", required=True, help="NAME=PATH of a src/ to serve")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("-c", "--concurrency", type=int, default=64)
    ap.add_argument("-n", "--num-requests", type=int, default=128)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--env", action="append", default=[], help="NAME=KEY=VALUE: a DS_* variable for one server")
    a = ap.parse_args()
    trees = dict(item.split("=", 1) for item in a.src)
    extra: dict[str, dict[str, str]] = {}
    for item in a.env:
        name, key, value = item.split("=", 2)
        extra.setdefault(name, {})[key] = value
    tmp = Path(tempfile.mkdtemp(prefix="api-path-"))
    model, _ = tiny_checkpoint(tmp / "model", CODER, with_tokenizer=True, max_position_embeddings=1024)
    rows = []
    for r in range(a.rounds):
        for name, src in trees.items():
            port = free_port()
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join([str(Path(src).resolve()), os.environ.get("PYTHONPATH", "")]),
                "DS_MODEL": str(model),
                "DS_RUNNER": "torch",
                "DS_MAX_BATCH_SIZE": str(a.concurrency),
                "DS_CONTEXT_LENGTH": "512",
                "DS_MAX_QUEUE_SIZE": "512",
                "DS_PORT": str(port),
                "DS_DATA_DIR": str(tmp / f"data-{name}"),
                "DS_RESPONSE_CACHE": "false",
                "DS_LOG_LEVEL": "warning",
                "DS_N_THREADS": "1",
                "DS_DRAIN_TIMEOUT_S": "1",
                **extra.get(name, {}),
            }
            log = tmp / f"server-{name}.log"
            with log.open("wb") as log_f:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "deepseek_serve", "serve"],
                    env=env,
                    stdout=log_f,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                url = f"http://127.0.0.1:{port}"
                wait_ready(url + "/health/ready", proc, log, timeout_s=300)
                sse_load.run_load(url, a.concurrency, a.concurrency, a.procs, 16)  # warm-up
                cpu0 = thread_cpu(proc.pid)
                row = sse_load.run_load(url, a.concurrency, a.num_requests, a.procs, a.max_tokens)
                cpu1 = thread_cpu(proc.pid)
                tokens = row["tok_s"] * row["elapsed_s"]
                events = row["events_s"] * row["elapsed_s"]
                loop_s = cpu1.get("loop", 0.0) - cpu0.get("loop", 0.0)
                engine_s = cpu1.get("engine", 0.0) - cpu0.get("engine", 0.0)
                row = {
                    "round": r,
                    "server": name,
                    **row,
                    "loop_cpu_s": loop_s,
                    "engine_cpu_s": engine_s,
                    "loop_us_per_token": 1e6 * loop_s / max(1.0, tokens),
                    "loop_us_per_event": 1e6 * loop_s / max(1.0, events),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(1)
    print(
        "\n| server | round | tok/s | events/s | tokens per event | event-loop thread CPU µs per token "
        "| TTFT p50 / p99 ms | ITL p50 / p99 ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['server']} | {row['round']} | {row['tok_s']:.0f} | {row['events_s']:.0f} | "
            f"{row['tokens_per_event']:.2f} | {row['loop_us_per_token']:.0f} | "
            f"{1e3 * row['ttft_p50']:.0f} / {1e3 * row['ttft_p99']:.0f} | "
            f"{1e3 * row['itl_p50']:.1f} / {1e3 * row['itl_p99']:.1f} |"
        )


if __name__ == "__main__":
    main()
