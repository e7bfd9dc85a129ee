"""Engine throughput on CPU: deepseek-serve's engine at 1/4/8 concurrent streams against plain
llama-cpp-python `Llama.create_completion` on the same model and threads, and optionally against
llama.cpp's C++ `llama-bench` token generation (tg) on the same file and threads.

    .venv/bin/python bench/engine.py [--model PATH] [--threads N] [--new-tokens 128] [--repeats 5]
        [--concurrency 1,4,8] [--llama-bench PATH]

Every stream generates exactly --new-tokens tokens (greedy, EOS ignored) from fixed prompts; every run
starts cold (the whole prompt is computed, nothing is reused from an earlier run) on both sides.
Prints a Markdown table with tokens/s and ratios; each row is the median of --repeats rounds, and every
round measures every configuration (interleaved). create_completion runs twice: with llama-cpp-python's
defaults (the baseline; flash attention off) and with flash attention on (the engine's default), so the
table shows how much of the engine's lead is that setting. With --llama-bench (see
bench/build_llama_server.sh), every round also runs `llama-bench -p 0 -n NEW_TOKENS -r 1` (its own
defaults otherwise: flash attention auto, weights repacked) in a child process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import platform
import statistics
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from deepseek_serve.cli._common import run_loop
from deepseek_serve.config import load_settings
from deepseek_serve.engine.async_engine import AsyncEngine
from deepseek_serve.engine.runners.llamacpp.backend import physical_cores
from deepseek_serve.engine.types import GenerationRequest, SamplingParams
from deepseek_serve.models.resolve import default_model_path

PROMPTS = [
    "Explain how a bicycle works.",
    "Write a short story about a lighthouse keeper.",
    "What are the benefits of drinking water?",
    "Describe the water cycle to a child.",
    "Give three tips for learning a new language.",
    "Why is the sky blue?",
    "Summarize the history of the printing press.",
    "How do bees make honey?",
]


async def engine_run(engine: AsyncEngine, concurrency: int, new_tokens: int) -> tuple[float, int, float]:
    """Aggregate output tokens/s with `concurrency` simultaneous requests, the token count, and the decode
    rate after the first token (tokens after the first / time after it, summed over the streams)."""

    async def one(i: int) -> tuple[int, float]:
        prompt = engine.render_chat([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
        req = GenerationRequest(
            request_id=f"bench-{concurrency}-{i}-{time.monotonic_ns()}",
            prompt=prompt,
            add_special_tokens=False,
            params=SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True),
        )
        _, last = await engine.complete(req)
        assert last.usage is not None and last.timings is not None and last.timings.first_token_s is not None
        n = last.usage.completion_tokens
        return n, (n - 1) / (last.timings.total_s - last.timings.first_token_s)

    start = time.perf_counter()
    done = await asyncio.gather(*(one(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - start
    counts = [n for n, _ in done]
    return sum(counts) / elapsed, sum(counts), sum(r for _, r in done)


# --- the baseline runs in a child process ---------------------------------------------------------------
# llama.cpp's CPU backend synchronizes its threads with OpenMP barriers. libgomp throttles its
# spin-wait to ~100 iterations as soon as more OpenMP threads exist in the process than CPUs, so a
# `Llama` created on the main thread next to the engine's own thread would slow *both* by ~35% on a
# 2-core machine (measured: 7.0 -> 10.5 ms per decode step). One process per library avoids that.
_plain: dict[bool, object] = {}


def _plain_init(model: str, threads: int) -> None:
    from llama_cpp import Llama

    for flash_attn in (False, True):  # llama-cpp-python's default (off), and the engine's default (on)
        _plain[flash_attn] = Llama(
            model_path=model,
            n_ctx=2048,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
            seed=0,
            flash_attn=flash_attn,
        )


def _plain_rate(prompt: str, new_tokens: int, flash_attn: bool) -> tuple[float, int]:
    """Plain `Llama.create_completion` tokens/s for one prompt (greedy)."""
    llm = _plain[flash_attn]
    text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    llm.reset()  # type: ignore[attr-defined]  # no prompt reuse from the previous call: prefill it all
    start = time.perf_counter()
    out = llm.create_completion(text, max_tokens=new_tokens, temperature=0.0)  # type: ignore[attr-defined]
    elapsed = time.perf_counter() - start
    n: int = out["usage"]["completion_tokens"]
    return n / elapsed, n


def llama_bench_tg(binary: str, model: Path, threads: int, new_tokens: int) -> float:
    """llama.cpp's `llama-bench` token generation rate (tg NEW_TOKENS, one repetition after its warm-up)."""
    cmd = [binary, "-m", str(model), "-t", str(threads), "-p", "0", "-n", str(new_tokens), "-r", "1", "-o", "json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--llama-bench", default="", help="llama-bench binary: add its tg rate to every round")
    args = ap.parse_args()
    threads = args.threads or physical_cores()
    levels = [int(c) for c in args.concurrency.split(",")]
    # the engine and the baseline load the same file (without --model: the SmolLM2 GGUF, not the
    # settings' default model)
    model_path = Path(args.model) if args.model else default_model_path()
    settings = load_settings(
        _env_file=None, model=str(model_path), n_threads=threads, max_batch_size=max(levels), context_length=8192
    )

    # create_completion stops at EOS; rates are per generated token either way.
    plain = ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_plain_init,
        initargs=(str(model_path), threads),
    )

    def plain_rate(prompt: str, flash_attn: bool) -> float:
        rate, n = plain.submit(_plain_rate, prompt, args.new_tokens, flash_attn).result()
        if n < args.new_tokens:
            print(f"note: create_completion stopped at EOS after {n} tokens", flush=True)
        return rate

    engine = AsyncEngine.from_settings(settings)
    await engine.start()
    await engine_run(engine, 1, 16)  # warm-up
    base: list[float] = []
    base_fa: list[float] = []
    tg: list[float] = []
    runs: dict[int, list[float]] = {c: [] for c in levels}
    decode: dict[int, list[float]] = {c: [] for c in levels}
    # rounds interleave every configuration, so a slow minute on a shared VM hits all of them
    # alike instead of skewing one row.
    for r in range(args.repeats):
        prompt = PROMPTS[0]  # the prompt of the engine's one-stream run
        base.append(plain_rate(prompt, flash_attn=False))
        base_fa.append(plain_rate(prompt, flash_attn=True))
        if args.llama_bench:
            tg.append(llama_bench_tg(args.llama_bench, model_path, threads, args.new_tokens))
        for c in levels:
            # every run starts cold, as the baseline does: no prompt reuse from an earlier run, and
            # no idle prefix-cache cells left by it (they would widen the KV span each step scans).
            await engine.clear_prefix_cache()
            rate, _, decode_rate = await engine_run(engine, c, args.new_tokens)
            runs[c].append(rate)
            decode[c].append(decode_rate)
        print(
            f"round {r + 1}: create_completion {base[-1]:.1f}, with flash_attn {base_fa[-1]:.1f}, "
            + (f"llama-bench tg {tg[-1]:.1f}, " if tg else "")
            + "engine "
            + ", ".join(f"x{c} {runs[c][-1]:.1f}" for c in levels),
            flush=True,
        )
    await engine.shutdown()
    plain.shutdown()
    base_rate, base_fa_rate = statistics.median(base), statistics.median(base_fa)
    results = {c: statistics.median(v) for c, v in runs.items()}
    decode_results = {c: statistics.median(v) for c, v in decode.items()}

    commit = subprocess.run(  # noqa: ASYNC221
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {threads} threads; commit {commit}; "
        f"model {model_path.name}; {args.new_tokens} new tokens/stream, greedy; median of {args.repeats}\n"
    )
    tg_rate = statistics.median(tg) if tg else 0.0

    def vs_tg(rate: float) -> str:
        return f" {rate / tg_rate:.2f}x |" if tg else ""

    print(
        "| run | concurrent streams | aggregate tok/s | vs create_completion | vs engine x1 |"
        + (" vs llama-bench tg |" if tg else "")
    )
    print("|---|---:|---:|---:|---:|" + ("---:|" if tg else ""))
    if tg:
        name = f"llama.cpp llama-bench tg{args.new_tokens}"
        print(f"| {name} | 1 | {tg_rate:.1f} | {tg_rate / base_rate:.2f}x | - | 1.00x |")
    print(f"| llama-cpp-python create_completion (defaults) | 1 | {base_rate:.1f} | 1.00x | - |" + vs_tg(base_rate))
    print(
        f"| llama-cpp-python create_completion, flash_attn=True | 1 | {base_fa_rate:.1f} | "
        f"{base_fa_rate / base_rate:.2f}x | - |" + vs_tg(base_fa_rate)
    )
    one = results.get(1, 0.0)
    for c, rate in results.items():
        print(
            f"| deepseek-serve engine | {c} | {rate:.1f} | {rate / base_rate:.2f}x | {rate / one if one else 0:.2f}x |"
            + vs_tg(rate)
        )
    for c, rate in decode_results.items():
        # llama-bench's tg counts decode steps only; these rows leave out each stream's prompt and first token
        print(
            f"| deepseek-serve engine, decode only (after the first token) | {c} | {rate:.1f} | - | - |" + vs_tg(rate)
        )


if __name__ == "__main__":
    # on uvloop, as under `deepseek-serve serve` (see cli/_common.run_loop for why it matters).
    run_loop(main())
