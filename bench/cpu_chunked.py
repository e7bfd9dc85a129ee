"""Chunked prefill on CPU (llama.cpp runner): what DS_LONG_PREFILL_TOKENS does to decoding streams and
to the long prompt itself.

    .venv/bin/python bench/cpu_chunked.py [--model PATH|PACK] [--threads N] [--streams 7]
        [--prompt-tokens 2000] [--caps 512,256] [--rounds 3]

Per round and cap (rounds interleave the caps): --streams greedy streams decode (EOS ignored) until
each has its first tokens, then one long prompt of about --prompt-tokens tokens arrives. Recorded:
the decoding streams' inter-token gaps before it (steady) and while it is prefilled (from its arrival
to its first token), and its time to first token. A cap equal to DS_PREFILL_CHUNK_TOKENS (512) is the
uncapped scheduler: the prompt takes the whole step budget left by the decode rows. The cap is set
on the running engine's scheduler between runs (`Scheduler.long_prefill_tokens`, read per step), so
every cap runs on one loaded model: two llama.cpp contexts in one process slow each other's OpenMP
threads (bench/engine.py says why). The prefix cache is cleared before every run. Prints a Markdown
table (medians over rounds, ratios against the first cap) and writes --out as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from deepseek_serve.bench.stats import percentile
from deepseek_serve.cli._common import run_loop
from deepseek_serve.config import load_settings
from deepseek_serve.engine.async_engine import AsyncEngine
from deepseek_serve.engine.runners.llamacpp.backend import physical_cores
from deepseek_serve.engine.types import GenerationRequest, SamplingParams
from deepseek_serve.models.packs import PACKS, pull_pack
from engine import PROMPTS  # bench/engine.py's short chat prompts

DECODE_TOKENS = 400  # per decoding stream: more than a run needs (they are closed once the prompt is in)
# a long prompt built from numbered, distinct sentences (no repeated block a prefix cache could share)
SENTENCE = "Note {i}: the {i}th entry of the maintenance log lists checks on valve {v} and pump {p}."


def long_prompt(engine: AsyncEngine, tokens: int) -> str:
    """The chat-rendered prompt of the most log lines that stay within `tokens` tokens."""
    lines: list[str] = []
    best = ""
    while True:
        i = len(lines)
        lines.append(SENTENCE.format(i=i, v=(i * 7) % 113, p=(i * 13) % 97))
        text = " ".join(lines) + "\nSummarize the log in one sentence."
        rendered = engine.render_chat([{"role": "user", "content": text}])
        if len(engine.tokenize(rendered, add_special_tokens=False)) > tokens:
            return best or rendered
        best = rendered


async def one_run(engine: AsyncEngine, streams: int, prompt: str, tag: str) -> dict[str, Any]:
    """Decoders first, then the long prompt once each decoder has 4 tokens; gaps and its TTFT."""
    arrivals: list[list[float]] = [[] for _ in range(streams)]
    started = [asyncio.Event() for _ in range(streams)]
    stop = asyncio.Event()

    async def decoder(i: int) -> None:
        req = GenerationRequest(
            request_id=f"{tag}-d{i}",
            prompt=engine.render_chat([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]),
            add_special_tokens=False,
            params=SamplingParams(temperature=0.0, max_tokens=DECODE_TOKENS, ignore_eos=True),
        )
        async with contextlib.aclosing(engine.generate(req)) as deltas:  # closing it aborts the request
            async for delta in deltas:
                if delta.token_ids:
                    arrivals[i].append(time.perf_counter())
                if len(arrivals[i]) >= 4:
                    started[i].set()
                if stop.is_set():
                    break

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(decoder(i)) for i in range(streams)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 300)
    print(f"  {tag}: decoders running after {time.perf_counter() - t0:.1f} s", flush=True)
    await asyncio.sleep(1.0)  # steady decoding (every prompt done) before the long one
    sent = time.perf_counter()
    req = GenerationRequest(
        request_id=f"{tag}-long",
        prompt=prompt,
        add_special_tokens=False,
        params=SamplingParams(temperature=0.0, max_tokens=1),
    )
    _, last = await engine.complete(req)
    first = time.perf_counter()
    assert last.usage is not None
    print(f"  {tag}: long prompt done after {time.perf_counter() - t0:.1f} s", flush=True)
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*tasks)
    print(f"  {tag}: decoders closed after {time.perf_counter() - t0:.1f} s", flush=True)

    steady: list[float] = []
    during: list[float] = []
    for ts in arrivals:
        for a, b in itertools.pairwise(ts):
            if sent - 1.0 <= a and b <= sent:
                steady.append(b - a)
            elif sent < b <= first:  # ends while the prompt is prefilled (the first one began before)
                during.append(b - a)
    return {
        "prompt_tokens": last.usage.prompt_tokens,
        "ttft_s": first - sent,
        "steady_ms": 1e3 * statistics.median(steady),
        "during_p50_ms": 1e3 * percentile(during, 50) if during else float("nan"),
        "during_p99_ms": 1e3 * percentile(during, 99) if during else float("nan"),
        "during_max_ms": 1e3 * max(during) if during else float("nan"),
        "gaps_during": len(during),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="a GGUF path or a pack name")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--streams", type=int, default=7)
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--caps", default="512,256")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    model = Path(args.model)
    if not model.exists():
        model = pull_pack(PACKS[args.model], Path.home() / ".cache" / "deepseek-serve" / "test-models", progress=False)
    results = run_loop(run(args, model))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


async def run(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    threads = args.threads or physical_cores()
    caps = [int(c) for c in args.caps.split(",")]
    settings = load_settings(
        _env_file=None,
        model=str(model),
        n_threads=threads,
        max_batch_size=args.streams + 1,
        # the KV cache holds every admitted sequence's prompt and max_tokens at once (the scheduler
        # admits by that reservation): room for all the streams and the long prompt
        context_length=args.streams * (DECODE_TOKENS + 64) + args.prompt_tokens + 256,
        prefill_chunk_tokens=max(caps),
        long_prefill_tokens=max(caps),
    )
    engine = AsyncEngine.from_settings(settings)
    await engine.start()
    scheduler = engine._core.scheduler
    prompt = long_prompt(engine, args.prompt_tokens)
    runs: dict[int, list[dict[str, Any]]] = {c: [] for c in caps}
    for r in range(args.rounds):
        for cap in caps:
            await engine.clear_prefix_cache()
            scheduler.long_prefill_tokens = cap
            row = await one_run(engine, args.streams, prompt, f"r{r}-c{cap}")
            runs[cap].append(row)
            print(f"round {r + 1} cap {cap}: " + json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
    await engine.shutdown()

    def med(cap: int, key: str) -> float:
        return statistics.median(row[key] for row in runs[cap])

    commit = subprocess.run(  # noqa: ASYNC221
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {threads} threads; commit {commit}; "
        f"model {model.name}; {args.streams} decoding streams + a {runs[caps[0]][0]['prompt_tokens']}-token "
        f"prompt; DS_PREFILL_CHUNK_TOKENS {max(caps)}; median of {args.rounds} rounds\n"
    )
    print(
        "| DS_LONG_PREFILL_TOKENS | steady ITL ms | ITL during prefill p50 / p99 / max ms | p99 / steady "
        "| long prompt TTFT s | x first cap |"
    )
    print("|---|---|---|---|---|---|")
    base_ttft = med(caps[0], "ttft_s")
    for cap in caps:
        steady = med(cap, "steady_ms")
        p99 = med(cap, "during_p99_ms")
        print(
            f"| {cap} | {steady:.1f} | {med(cap, 'during_p50_ms'):.0f} / {p99:.0f} / {med(cap, 'during_max_ms'):.0f} "
            f"| {p99 / steady:.1f} | {med(cap, 'ttft_s'):.2f} | {med(cap, 'ttft_s') / base_ttft:.2f} |"
        )
    return {"caps": caps, "runs": runs, "commit": commit, "threads": threads, "model": model.name}


if __name__ == "__main__":
    main()
