"""Chunked prefill on the GPU: an 8,000-token prompt arriving while 63 streams decode.

Run on a CUDA machine from the repository root:
    PYTHONPATH=src python3 bench/gpu_chunked.py [--out DIR] [--chunks 512,256]

Random bf16 weights of the DeepSeek-R1-Distill-Qwen-1.5B shape, 64 slots of 8,448 tokens, every graph
captured first. 63 sequences (128-token prompts) decode; then the long prompt is admitted and each step
carries the 63 decode rows plus one chunk of the prompt, sized by the engine scheduler's rule (a step
holds at most max(DS_PREFILL_CHUNK_TOKENS, running) tokens, decode rows first). Every step is timed
(its tokens come back to the host at its end, so a step's wall time is the decoding streams' inter-token
latency). Prints the steady step (median of 64 decode-only steps), the p50 / p99 / max step while the
prompt is prefilled, and p99 / steady.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

import gpu  # bench/gpu.py
from deepseek_serve.engine.runners import ScheduledSeq
from deepseek_serve.engine.sequence import Sequence, SequenceStatus
from deepseek_serve.engine.types import SamplingParams

SHAPE = gpu.SHAPES["r1-distill-qwen-1.5b"]
DECODERS, LONG_PROMPT, MAX_LEN = 63, 8000, 8448


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def step(runner: Any, batch: list[ScheduledSeq]) -> float:
    t0 = time.perf_counter()
    results = runner.step(batch)
    dt = time.perf_counter() - t0
    for e, r in zip(batch, results, strict=True):
        if r is not None:
            e.seq.output_token_ids.append(r.token_id)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--chunks", default="512,256")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu.LOG_FILE = out / "log.txt"
    hf = gpu.hf_model(SHAPE, torch.bfloat16, seed=0)
    runner = gpu.our_runner(hf, SHAPE, torch.bfloat16, slots=DECODERS + 1, max_len=MAX_LEN)
    del hf
    t0 = time.perf_counter()
    graphs = runner.warmup(512)
    gpu.log(f"{graphs} graphs captured in {time.perf_counter() - t0:.1f} s")
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0)
    decoders = [
        Sequence(f"d{i}", ids, params, MAX_LEN - 256, 1e9)
        for i, ids in enumerate(torch.randint(0, SHAPE["vocab_size"], (DECODERS, 128), generator=gen).tolist())
    ]
    for s in decoders:
        runner.allocate(s)
        s.status = SequenceStatus.RUNNING
    while any(s.is_prefilling for s in decoders):  # prompts in 512-token steps, as the scheduler would
        batch, budget = [], 512
        for s in decoders:
            if not s.is_prefilling:
                batch.append(ScheduledSeq(s, 1, True))
            elif budget > 0:
                n = min(budget, s.num_prompt_tokens - s.num_computed_tokens)
                batch.append(ScheduledSeq(s, n, s.num_computed_tokens + n == s.num_prompt_tokens))
                budget -= n
        step(runner, batch)
    results: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "rows": []}
    for chunk in [int(c) for c in a.chunks.split(",")]:
        # a new prompt per run: the last one's KV stays in the prefix cache
        long_prompt = torch.randint(0, SHAPE["vocab_size"], (LONG_PROMPT,), generator=gen).tolist()
        steady = [step(runner, [ScheduledSeq(s, 1, True) for s in decoders]) for _ in range(64)]
        long = Sequence(f"long{chunk}", long_prompt, params, 1, 1e9)
        runner.allocate(long)
        during = []
        while long.is_prefilling:
            budget = max(chunk, DECODERS + 1) - DECODERS
            n = min(budget, long.num_prompt_tokens - long.num_computed_tokens)
            batch = [ScheduledSeq(s, 1, True) for s in decoders]
            batch.append(ScheduledSeq(long, n, long.num_computed_tokens + n == long.num_prompt_tokens))
            during.append(step(runner, batch))
        runner.free(long)
        base = pct(steady, 0.5)
        row = {
            "chunk_tokens": chunk,
            "prompt_chunk": max(chunk, DECODERS + 1) - DECODERS,
            "steps_during_prefill": len(during),
            "steady_ms": 1e3 * base,
            "during_p50_ms": 1e3 * pct(during, 0.5),
            "during_p99_ms": 1e3 * pct(during, 0.99),
            "during_max_ms": 1e3 * max(during),
            "p99_over_steady": pct(during, 0.99) / base,
            "prefill_s": sum(during),
        }
        gpu.log(json.dumps(row))
        results["rows"].append(row)
    (out / "chunked.json").write_text(json.dumps(results, indent=2))
    gpu.log(
        "\n| DS_PREFILL_CHUNK_TOKENS | prompt tokens / step | steps | steady ms | p50 / p99 / max ms | p99 / steady |"
    )
    gpu.log("|---|---|---|---|---|---|")
    for r in results["rows"]:
        gpu.log(
            f"| {r['chunk_tokens']} | {r['prompt_chunk']} | {r['steps_during_prefill']} | {r['steady_ms']:.2f} | "
            f"{r['during_p50_ms']:.2f} / {r['during_p99_ms']:.2f} / {r['during_max_ms']:.2f} | "
            f"{r['p99_over_steady']:.2f} |"
        )


if __name__ == "__main__":
    main()
