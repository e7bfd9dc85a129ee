"""Engine throughput on CPU: deepseek-serve's engine at 1/4/8 concurrent streams against plain
llama-cpp-python `Llama.create_completion` on the same model and threads.

    .venv/bin/python bench/engine.py [--model PATH] [--threads N] [--new-tokens 128] [--repeats 3]

Every stream generates exactly --new-tokens tokens (greedy, EOS ignored) from fixed prompts.
Prints a Markdown table with tokens/s and ratios; the median of --repeats runs is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import subprocess
import time
from pathlib import Path

from deepseek_serve.config import load_settings
from deepseek_serve.engine.async_engine import AsyncEngine
from deepseek_serve.engine.llamacpp_runner import physical_cores
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


async def engine_run(engine: AsyncEngine, concurrency: int, new_tokens: int) -> tuple[float, int]:
    """Aggregate output tokens/s with `concurrency` simultaneous requests."""

    async def one(i: int) -> int:
        prompt = engine.render_chat([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
        req = GenerationRequest(request_id=f"bench-{concurrency}-{i}-{time.monotonic_ns()}", prompt=prompt,
                                add_special_tokens=False,
                                params=SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True))
        _, last = await engine.complete(req)
        assert last.usage is not None
        return last.usage.completion_tokens

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - start
    return sum(counts) / elapsed, sum(counts)


def llama_cpp_run(model: Path, threads: int, new_tokens: int) -> float:
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False,
                seed=0)
    rates = []
    for prompt in PROMPTS[:3]:
        text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        start = time.perf_counter()
        out = llm.create_completion(text, max_tokens=new_tokens, temperature=0.0, logit_bias=None)
        elapsed = time.perf_counter() - start
        n = out["usage"]["completion_tokens"]  # type: ignore[index]
        rates.append(n / elapsed)
    llm.close()
    return statistics.median(rates)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", default="1,4,8")
    args = ap.parse_args()
    threads = args.threads or physical_cores()
    levels = [int(c) for c in args.concurrency.split(",")]
    settings = load_settings(_env_file=None, model=args.model, n_threads=threads, max_batch_size=max(levels),
                             context_length=8192)
    model_path = Path(args.model) if args.model else default_model_path()

    # NOTE: create_completion stops at EOS; rates are per generated token either way.
    base = llama_cpp_run(model_path, threads, args.new_tokens)

    engine = AsyncEngine.from_settings(settings)
    await engine.start()
    await engine_run(engine, 1, 16)  # warm-up
    results: dict[int, float] = {}
    for c in levels:
        rates = [(await engine_run(engine, c, args.new_tokens))[0] for _ in range(args.repeats)]
        results[c] = statistics.median(rates)
    await engine.shutdown()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"],  # noqa: ASYNC221
                            capture_output=True, text=True).stdout.strip()
    print(f"\nmachine: {platform.processor() or platform.machine()}, {threads} threads; commit {commit}; "
          f"model {model_path.name}; {args.new_tokens} new tokens/stream, greedy; median of {args.repeats}\n")
    print("| run | concurrent streams | aggregate tok/s | vs create_completion | vs engine x1 |")
    print("|---|---:|---:|---:|---:|")
    print(f"| llama-cpp-python create_completion | 1 | {base:.1f} | 1.00x | - |")
    one = results.get(1, 0.0)
    for c, r in results.items():
        print(f"| deepseek-serve engine | {c} | {r:.1f} | {r / base:.2f}x | {r / one if one else 0:.2f}x |")


if __name__ == "__main__":
    asyncio.run(main())
