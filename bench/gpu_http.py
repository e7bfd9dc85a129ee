"""The whole HTTP path on the GPU against the in-process runner, one run side by side.

Run on a CUDA machine from the repository root (the server's Python packages installed):
    PYTHONPATH=src python3 bench/gpu_http.py --tokenizer DIR [--out DIR]

1. writes a Hugging Face folder with random bf16 weights of the deepseek-coder-1.3b shape and the
   tokenizer files of --tokenizer;
2. in process: `TorchRunner` (CUDA graphs, compiled decode) on those weights, greedy, 128-token
   prompts, 256 new tokens, at 1 / 8 / 64 / 128 concurrent sequences (bench/gpu.py's method);
3. starts the real server (`python -m deepseek_serve serve`, torch runner, DS_MAX_BATCH_SIZE=128,
   DS_CONTEXT_LENGTH=2048 so that all 128 streams get a slot as in process; --context 16384 for the
   model's own, where the memory plan sizes fewer slots) and times start -> ready;
4. loads it at 1 / 8 / 64 / 128 streams with bench/sse_load.py (the `short` workload, 256 new tokens,
   ignore_eos, `deepseek-serve bench`'s client code spread over several processes, so the client is
   not the bottleneck; --single-client: one `deepseek-serve bench` process, as before): a first pass
   right after ready (no warm-up request), then a second pass;
5. with --before SRC: the same against a server running the code in SRC (another checkout's src/),
   one pass after a warm-up pass, for a before/after on the same machine; with --variant, this code
   with other settings (e.g. --variant workers4:DS_ENGINE_PROCESS=on,DS_WORKERS=4: four API workers
   over one engine process), passes as --variant-passes says; --skip-default: no default server.
Writes summary.json, server-*.log and log.txt under --out (default: $OUT or ./bench-out).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch

import gpu  # bench/gpu.py
import sse_load  # bench/sse_load.py
from common import free_port

SHAPE = gpu.SHAPES["deepseek-coder-1.3b"]
STREAMS = (1, 8, 64, 128)
REQUESTS = {1: 4, 8: 16, 64: 128, 128: 256}
CLIENT_PROCS = {1: 1, 8: 2, 64: 6, 128: 8}


def write_model(dst: Path, tokenizer: Path) -> None:
    hf = gpu.hf_model(SHAPE, torch.bfloat16, seed=0)
    hf.save_pretrained(dst, safe_serialization=True)
    for f in tokenizer.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, dst / f.name)
    del hf
    torch.cuda.empty_cache()


def in_process(model_dir: Path, streams: tuple[int, ...] = STREAMS) -> dict[int, float]:
    from deepseek_serve.engine.runners.pytorch.loading import load_model
    from deepseek_serve.engine.runners.pytorch.runner import TorchRunner

    model = load_model(model_dir, torch.bfloat16, torch.device("cuda"))
    runner = TorchRunner(model, None, num_slots=128, max_len=512, device=torch.device("cuda"), dtype=torch.bfloat16)
    runner.warmup(512)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for conc in streams:
        prompts = [torch.randint(0, SHAPE["vocab_size"], (128,), generator=gen).tolist() for _ in range(conc)]
        gpu.bench_runner(runner, prompts, 2)
        r = gpu.bench_runner(runner, prompts, 256)
        out[conc] = r["tok_s"]
        gpu.log(f"in process, {conc} streams: {r['tok_s']:.0f} tok/s ({r['decode_tok_s']:.0f} decode)")
    del runner, model
    torch.cuda.empty_cache()
    return out


def engine_core(model_dir: Path, tmp: Path, context: int, out: Path) -> dict[str, dict[int, float]]:
    """The server's engine core (`LLMEngine`: scheduler, runner, detokenizer, deltas) driven in this
    thread, without the event loop or HTTP: closed loop, `conc` requests in the system, 32-token
    prompts, 256 new tokens; with overlapped steps (the default) and one step at a time, on the same
    runner. Then 64 streams again under cProfile (engine-core-64.prof.txt, overlapped)."""
    import cProfile
    import dataclasses
    import io
    import pstats

    from deepseek_serve.config import load_settings
    from deepseek_serve.engine.llm_engine import LLMEngine
    from deepseek_serve.engine.loader import load_model as load_engine
    from deepseek_serve.engine.types import GenerationRequest, SamplingParams

    settings = load_settings(
        _env_file=None,
        model=str(model_dir),
        runner="torch",
        max_batch_size=128,
        context_length=context,
        max_queue_size=512,
        data_dir=tmp / "data-core",
    )
    overlapped = load_engine(settings).core
    cores = {
        "overlap": overlapped,
        "sync": LLMEngine(overlapped.runner, dataclasses.replace(overlapped.config, overlap=False)),
    }
    gen = torch.Generator().manual_seed(1)
    params = SamplingParams(max_tokens=256, temperature=0.0, ignore_eos=True)

    def run(core: LLMEngine, conc: int, total: int, label: str = "") -> float:
        sent = done = tokens = 0
        t0 = time.perf_counter()
        steps: list[float] = []
        while done < total:
            while sent < total and sent - done < conc:
                ids = tuple(torch.randint(100, 30000, (32,), generator=gen).tolist())
                request = GenerationRequest(f"r{sent}", prompt_token_ids=ids, params=params)
                core.add_sequence(core.make_sequence(request))
                sent += 1
            t_step = time.perf_counter()
            outputs = core.step()
            steps.append(time.perf_counter() - t_step)
            for _, delta, _ in outputs:
                if delta is not None and delta.finished:
                    done += 1
                    tokens += delta.usage.completion_tokens if delta.usage else 0
        elapsed = time.perf_counter() - t0
        if label:
            ms = sorted(1e3 * x for x in steps)
            slow = sum(x for x in ms if x > 10)
            gpu.log(
                f"  {label}: {len(ms)} steps in {elapsed:.2f} s, step p50 {ms[len(ms) // 2]:.2f} / p99 "
                f"{ms[int(len(ms) * 0.99)]:.2f} / max {ms[-1]:.1f} ms, {slow:.0f} ms in steps over 10 ms"
            )
        return tokens / elapsed

    out_rates: dict[str, dict[int, float]] = {}
    for conc in STREAMS:
        for name, core in cores.items():
            run(core, conc, conc)  # every shape of this concurrency seen once by both
            out_rates.setdefault(name, {})[conc] = run(core, conc, REQUESTS[conc], f"{name} c={conc}")
            gpu.log(f"engine core in process ({name}), {conc} streams: {out_rates[name][conc]:.0f} tok/s")
    prof = cProfile.Profile()
    prof.enable()
    rate = run(overlapped, 64, 64)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(40)
    (out / "engine-core-64.prof.txt").write_text(f"{rate:.0f} tok/s under cProfile\n" + buf.getvalue())
    overlapped.close()
    return out_rates


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health/ready", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("server not ready")


def single_client(url: str, conc: int, label: str, tmp: Path) -> dict[str, Any]:
    """One `deepseek-serve bench` process (how this was measured first)."""
    out_dir = tmp / f"{label}-c{conc}"
    cmd = [
        sys.executable, "-m", "deepseek_serve", "bench", "--base-url", url, "-w", "short",
        "--max-tokens", "256", "--ignore-eos", "-c", str(conc), "-n", str(REQUESTS[conc]),
        "--warmup", "0", "--no-progress", "--seed", "0", "--label", f"{label}-c{conc}", "-o", str(out_dir),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    res = json.loads(next(out_dir.glob("*.json")).read_text())
    m = res["phases"][0]["metrics"]
    return {
        "ok": m["num_ok"],
        "tok_s": m["output_token_throughput"],
        "ttft_p50": m["ttft"]["p50"],
        "ttft_p99": m["ttft"]["p99"],
        "itl_p99": m["itl"]["p99"],
    }


def http_bench(url: str, conc: int, label: str, tmp: Path, single: bool, timeout_s: float) -> dict[str, Any]:
    if single:
        row = single_client(url, conc, label, tmp)
    else:
        row = sse_load.run_load(url, conc, REQUESTS[conc], CLIENT_PROCS[conc], 256, timeout_s=timeout_s)
    row = {**row, "streams": conc, "pass": label}
    gpu.log(json.dumps(row))
    return row


def start_server(
    name: str, model_dir: Path, tmp: Path, out: Path, context: int, pythonpath: str | None, extra: dict[str, str]
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "DS_MODEL": str(model_dir),
        "DS_RUNNER": "torch",
        "DS_MAX_BATCH_SIZE": "128",
        "DS_CONTEXT_LENGTH": str(context),
        "DS_MAX_QUEUE_SIZE": "512",
        "DS_PORT": str(port),
        "DS_DATA_DIR": str(tmp / f"data-{name}"),
        "DS_RESPONSE_CACHE": "false",
        "DS_LOG_FORMAT": "console",
        "DS_LOG_LEVEL": "warning",
        "DS_DRAIN_TIMEOUT_S": "1",
        "TORCH_LOGS": "recompiles",  # a compile after ready shows in the server's log
        "PYTHONFAULTHANDLER": "1",  # stacks of every thread on SIGABRT (a pass that times out)
        **extra,
    }
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    log_f = (out / f"server-{name}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepseek_serve", "serve"], env=env, stdout=log_f, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    return proc, f"http://127.0.0.1:{port}"


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except ProcessLookupError:  # already gone (a stalled server aborted)
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def serve_and_load(
    name: str,
    model_dir: Path,
    a: argparse.Namespace,
    out: Path,
    passes: tuple[str, ...],
    pythonpath: str | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Start a server, load it pass by pass ("warm": an unrecorded short load), stop it."""
    proc, url = start_server(name, model_dir, a.tmp, out, a.context, pythonpath, extra or {})
    result: dict[str, Any] = {}
    try:
        result["ready_s"] = wait_ready(url, proc, 400)
        gpu.log(f"server {name} ready in {result['ready_s']:.1f} s after start")
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        result["gpu_memory_after_ready"] = smi.stdout.strip()
        rows = []
        for label in passes:
            for conc in (64,) if label == "warm" else a.streams:
                try:
                    if label == "warm":  # unrecorded: 64 streams of 16 tokens
                        sse_load.run_load(url, 64, 64, 4, 16, timeout_s=a.pass_timeout)
                    else:
                        rows.append(http_bench(url, conc, f"{name}-{label}", a.tmp, a.single_client, a.pass_timeout))
                except TimeoutError as exc:
                    # a stalled server: SIGABRT makes faulthandler (PYTHONFAULTHANDLER) write every
                    # thread's stack of every server process (the engine process too) to its log
                    gpu.log(f"http {name} {label} c={conc}: {exc}; stacks in server-{name}.log")
                    os.killpg(proc.pid, signal.SIGABRT)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(30)
                    break
                except Exception as exc:
                    gpu.log(f"http {name} {label} c={conc} failed: {exc!r}"[:2000])
            if proc.poll() is not None:
                break
        result["http"] = rows
    finally:
        stop_server(proc)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--tokenizer", required=True, type=Path)
    ap.add_argument("--tmp", default="/tmp/gpu-http", type=Path)
    ap.add_argument("--skip-in-process", action="store_true")
    ap.add_argument("--skip-engine-core", action="store_true", help="in process: the runner only")
    ap.add_argument("--context", type=int, default=2048, help="DS_CONTEXT_LENGTH of the server")
    ap.add_argument("--streams", default=",".join(map(str, STREAMS)))
    ap.add_argument("--single-client", action="store_true", help="one `deepseek-serve bench` process")
    ap.add_argument(
        "--pass-timeout", type=float, default=120.0, help="seconds a load pass may take (then: the server's stacks)"
    )
    ap.add_argument("--before", default=None, help="PYTHONPATH of the code to compare with (its src/)")
    ap.add_argument("--skip-default", action="store_true", help="no server with the default settings")
    ap.add_argument(
        "--variant-passes", default="warm,second", help="the passes of each --variant server (first: right after ready)"
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME:KEY=VALUE,KEY=VALUE: also this code with these DS_* settings (a warm-up, then one pass)",
    )
    a = ap.parse_args()
    a.streams = tuple(int(x) for x in a.streams.split(","))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu.LOG_FILE = out / "log.txt"
    torch._logging.set_logs(recompiles=True)  # a compile during a measurement shows in the log
    a.tmp.mkdir(parents=True, exist_ok=True)
    model_dir = a.tmp / "coder-1.3b-random"
    summary: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC")}
    t0 = time.monotonic()
    write_model(model_dir, a.tokenizer)
    gpu.log(f"model written in {time.monotonic() - t0:.1f} s")
    if not a.skip_in_process:
        summary["in_process_tok_s"] = in_process(model_dir, a.streams)
        if not a.skip_engine_core:
            summary["engine_core_tok_s"] = engine_core(model_dir, a.tmp, a.context, out)
        gc.collect()
        torch.cuda.empty_cache()  # the servers size their KV from the free memory
        gpu.log(f"GPU memory in use after the in-process runs: {torch.cuda.memory_allocated() / 2**30:.2f} GiB")
    servers: list[tuple[str, tuple[str, ...], str | None, dict[str, str]]] = []
    if not a.skip_default:
        servers.append(("after", ("first", "second"), None, {}))
    if a.before:
        pp = os.pathsep.join([a.before, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])
        servers.append(("before", ("warm", "second"), pp, {}))
    for variant in a.variant:
        name, _, pairs = variant.partition(":")
        env = dict(pair.split("=", 1) for pair in pairs.split(",") if pair)
        servers.append((name, tuple(a.variant_passes.split(",")), None, env))
    for name, passes, pythonpath, extra in servers:
        try:
            summary[name] = serve_and_load(name, model_dir, a, out, passes, pythonpath, extra)
        except Exception as exc:
            gpu.log(f"server {name} failed: {exc!r}"[:2000])
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    inproc = summary.get("in_process_tok_s", {})
    cores = summary.get("engine_core_tok_s", {})
    core = cores.get("overlap", {})
    gpu.log("\n| streams | runner tok/s | engine core overlapped tok/s (x runner) | one step at a time (x runner) |")
    gpu.log("|---|---|---|---|")
    for conc in a.streams:
        ip = inproc.get(conc) or float("nan")
        ov, sy = core.get(conc, 0.0), cores.get("sync", {}).get(conc, 0.0)
        gpu.log(f"| {conc} | {ip:.0f} | {ov:.0f} ({ov / ip:.2f}) | {sy:.0f} ({sy / ip:.2f}) |")
    gpu.log(
        "\n| server | streams | pass | HTTP tok/s | in-process runner tok/s | ratio | engine core tok/s | ratio "
        "| TTFT p50 / p99 ms | ITL p99 ms |"
    )
    gpu.log("|---|---|---|---|---|---|---|---|---|---|")
    for name, *_ in servers:
        for r in summary.get(name, {}).get("http", []):
            ip = inproc.get(r["streams"])
            ratio = f"{r['tok_s'] / ip:.2f}" if ip else "-"
            ec = core.get(r["streams"])
            ratio_core = f"{r['tok_s'] / ec:.2f}" if ec else "-"
            gpu.log(
                f"| {name} | {r['streams']} | {r['pass']} | {r['tok_s']:.0f} | {ip or 0:.0f} | {ratio} | "
                f"{ec or 0:.0f} | {ratio_core} | "
                f"{1e3 * r['ttft_p50']:.0f} / {1e3 * r['ttft_p99']:.0f} | {1e3 * r['itl_p99']:.1f} |"
            )


if __name__ == "__main__":
    main()
