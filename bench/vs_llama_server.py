"""deepseek-serve side by side with llama.cpp's own C++ `llama-server`: the same GGUF file, threads,
parallel slots and KV context, both servers up at once and measured in alternation.

    .venv/bin/python bench/vs_llama_server.py --model FILE.gguf [--llama-server PATH] [--threads 0]
        [--context 16384] [--parallel 8] [--concurrency 1,8] [--requests-per-client 3]
        [--max-tokens 128] [--temperature 0.7] [--rounds 1] [--out DIR] [--ours-env DS_X=Y ...]

Load: `deepseek-serve bench` (OpenAI API, streaming, `short` chat workload, seed 0, `ignore_eos` so
every answer has exactly --max-tokens tokens, one unmeasured warm-up request per run), closed loop
with C clients x --requests-per-client requests. Each round runs every concurrency level on both
servers, the server order flipped every round, so a slow minute on a shared machine hits both.
Memory: peak RSS of each server process during its runs (sampled every 0.25 s by the bench), and its
RSS split into anonymous and file-backed pages (memory-mapped weights) at the end.
llama-server: build it with `bench/build_llama_server.sh` (the llama.cpp of the pinned binding).
Prints a Markdown table with ratios; writes summary.json and every run's results under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import free_port, wait_ready

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def memory(pid: int) -> dict[str, int]:
    """VmRSS and its anonymous / file-backed parts, bytes (Linux /proc)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def physical_cores() -> int:
    from deepseek_serve.engine.runners.llamacpp.backend import physical_cores as cores

    return cores()


def run_bench(name: str, port: int, pid: int, clients: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = [
        str(VENV_BIN / "deepseek-serve"), "bench", "--base-url", f"http://127.0.0.1:{port}", "--seed", "0",
        "--no-progress", "--server-pid", str(pid), "--label", name, "-o", str(out / name),
        "-w", "short", "-c", str(clients), "-n", str(clients * args.requests_per_client),
        "--max-tokens", str(args.max_tokens), "--temperature", str(args.temperature), "--ignore-eos",
        "--warmup", "1", "--timeout", "900",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    doc = json.loads((out / name / "results.json").read_text())
    phase = doc["phases"][0]
    m = phase["metrics"]
    return {
        "tok_s": m["output_token_throughput"],
        "ttft_p50": m["ttft"]["p50"],
        "ttft_p99": m["ttft"]["p99"],
        "tpot_mean": m["tpot"]["mean"] if m["tpot"] else None,
        "errors": m["num_errors"],
        "peak_rss": phase["server_peak_rss_bytes"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="GGUF file both servers load")
    ap.add_argument("--llama-server", default="", help="llama-server binary (default: bench/build_llama_server.sh)")
    ap.add_argument("--threads", type=int, default=0, help="0 = physical cores")
    ap.add_argument("--context", type=int, default=16384, help="KV cells in total (llama-server -c)")
    ap.add_argument("--parallel", type=int, default=8, help="llama-server -np = DS_MAX_BATCH_SIZE")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--requests-per-client", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--ours-env", action="append", default=[], help="extra DS_X=Y setting for deepseek-serve")
    ap.add_argument("--llama-arg", action="append", default=[], help="extra llama-server argument")
    args = ap.parse_args()
    threads = args.threads or physical_cores()
    levels = [int(c) for c in args.concurrency.split(",")]
    out = args.out or Path(tempfile.mkdtemp(prefix="vs-llama-server-"))
    out.mkdir(parents=True, exist_ok=True)
    binary = (
        args.llama_server
        or subprocess.run(
            [str(REPO / "bench" / "build_llama_server.sh")], check=True, capture_output=True, text=True
        ).stdout.strip()
    )

    servers: dict[str, dict[str, Any]] = {}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        port = free_port()
        log = out / "llama-server.log"
        cmd = [
            binary,
            "-m",
            args.model,
            "-t",
            str(threads),
            "-tb",
            str(threads),
            "-np",
            str(args.parallel),
            "-c",
            str(args.context),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-webui",
            *args.llama_arg,
        ]
        proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        procs.append(proc)
        wait_ready(f"http://127.0.0.1:{port}/health", proc, log, timeout_s=600, poll_s=0.5)
        servers["llama-server"] = {"port": port, "proc": proc, "command": " ".join(cmd)}

        port = free_port()
        log = out / "deepseek-serve.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DS_")}
        settings = {
            "DS_MODEL": args.model, "DS_N_THREADS": str(threads), "DS_MAX_BATCH_SIZE": str(args.parallel),
            "DS_CONTEXT_LENGTH": str(args.context), "DS_RESPONSE_CACHE": "false", "DS_AUTH": "off",
            "DS_LOG_LEVEL": "warning", "DS_DATA_DIR": str(out / "deepseek-serve.data"),
        }  # fmt: skip
        settings.update(kv.split("=", 1) for kv in args.ours_env)
        env.update(settings)
        cmd = [str(VENV_BIN / "deepseek-serve"), "serve", "--host", "127.0.0.1", "--port", str(port)]
        proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
        procs.append(proc)
        wait_ready(f"http://127.0.0.1:{port}/health/ready", proc, log, timeout_s=600, poll_s=0.5)
        servers["deepseek-serve"] = {
            "port": port,
            "proc": proc,
            "command": " ".join(f"{k}={v}" for k, v in settings.items()) + " " + " ".join(cmd),
        }

        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for r in range(args.rounds):
            order = ["llama-server", "deepseek-serve"] if r % 2 == 0 else ["deepseek-serve", "llama-server"]
            for c in levels:
                for name in order:
                    s = servers[name]
                    res = run_bench(f"{name}-c{c}-r{r + 1}", s["port"], s["proc"].pid, c, args, out)
                    runs.setdefault((name, c), []).append(res)
                    print(
                        f"round {r + 1} {name} c={c}: {res['tok_s']:.2f} tok/s, TTFT p99 "
                        f"{res['ttft_p99'] * 1000:.0f} ms, peak RSS {res['peak_rss'] / 2**20:.0f} MiB",
                        flush=True,
                    )
        for s in servers.values():
            s["memory_end"] = memory(s["proc"].pid)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def med(name: str, c: int, key: str) -> float:
        return statistics.median(x[key] for x in runs[(name, c)])

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, {threads} threads; "
        f"commit {commit.stdout.strip()}; model {Path(args.model).name}; context {args.context}, "
        f"{args.parallel} slots; {args.requests_per_client} requests per client, {args.max_tokens} tokens, "
        f"temperature {args.temperature}; median of {args.rounds} round(s)\n"
    )
    print("| streams | server | tok/s | vs llama-server | TTFT p50 | TTFT p99 | vs llama-server | TPOT mean | errors |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for c in levels:
        base_tok, base_ttft = med("llama-server", c, "tok_s"), med("llama-server", c, "ttft_p99")
        for name in ("llama-server", "deepseek-serve"):
            tok, p99 = med(name, c, "tok_s"), med(name, c, "ttft_p99")
            errors = sum(x["errors"] for x in runs[(name, c)])
            tpot = med(name, c, "tpot_mean")
            print(
                f"| {c} | {name} | {tok:.2f} | {tok / base_tok:.2f}x | {med(name, c, 'ttft_p50') * 1000:.0f} ms | "
                f"{p99 * 1000:.0f} ms | {p99 / base_ttft:.2f}x | {tpot * 1000:.0f} ms | {errors} |"
            )
    print("\n| server | peak RSS (all runs) | RSS at the end | of it anonymous | of it file-backed (mmap) |")
    print("|---|---:|---:|---:|---:|")
    peaks = {}
    for name, s in servers.items():
        peaks[name] = max(x["peak_rss"] for (n, _), xs in runs.items() if n == name for x in xs)
        m = s["memory_end"]
        print(
            f"| {name} | {peaks[name] / 2**20:.0f} MiB | {m['VmRSS'] / 2**20:.0f} MiB | "
            f"{m['RssAnon'] / 2**20:.0f} MiB | {m['RssFile'] / 2**20:.0f} MiB |"
        )
    print(
        f"\ndeepseek-serve peak RSS - llama-server peak RSS: "
        f"{(peaks['deepseek-serve'] - peaks['llama-server']) / 2**20:+.0f} MiB"
    )
    summary = {
        "servers": {
            n: {"command": s["command"], "memory_end": s["memory_end"], "peak_rss": peaks[n]}
            for n, s in servers.items()
        },
        "runs": {f"{n}-c{c}": xs for (n, c), xs in runs.items()},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "threads": threads,
        "commit": commit.stdout.strip(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
