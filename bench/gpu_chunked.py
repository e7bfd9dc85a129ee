"""Chunked prefill on the GPU: an 8,000-token prompt arriving while 63 streams decode.

Run on a CUDA machine from the repository root:
    PYTHONPATH=src python3 bench/gpu_chunked.py [--out DIR] [--chunks 256,512,f192] [--paths graph,eager,sdpa]

Random bf16 weights of the DeepSeek-R1-Distill-Qwen-1.5B shape, 64 slots of 8,448 tokens, every graph
captured first. 63 sequences (128-token prompts) decode; then the long prompt is admitted and each step
carries the 63 decode rows plus one chunk of the prompt, sized by the engine scheduler's rule
(`scheduler.prompt_chunk_cap`: a chunk spec N is DS_LONG_PREFILL_TOKENS=N under the default
DS_PREFILL_CHUNK_TOKENS=512; 256, the default, leaves 193 prompt tokens beside 63 decode rows). Every step is timed
(its tokens come back to the host at its end, so a step's wall time is the decoding streams' inter-token
latency). Prints the steady step (median of 64 decode-only steps), the p50 / p99 / max step while the
prompt is prefilled, and p99 / steady. A chunk spec `fN` instead takes N prompt tokens per step
whatever the number of decode rows (another rule, for comparison).

Prefill paths compared (`--paths`; the same runner, switched between prompts):
- graph: each step's chunk replays the packed prefill graph of its size (`PackedGraphs`), attention
  `chunk_attention`;
- eager: the same forward without the graph (Triton chunk attention, Python dispatch per op);
- sdpa: the eager forward with SDPA's bottom-right causal attention over a gathered copy of the slot.

Before that, two device timings: the chunk attention kernel alone (one layer, 449 new tokens at
position 7,000) per tile configuration against SDPA (`--best-tile`: the fastest is used below), and
one chunk graph replay per size at that position (the GPU time a chunk adds to a step).
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
from deepseek_serve.engine.runners.pytorch import chunk_attention as ca
from deepseek_serve.engine.runners.pytorch import packing
from deepseek_serve.engine.runners.pytorch.ops import attend_causal
from deepseek_serve.engine.scheduler import prompt_chunk_cap
from deepseek_serve.engine.sequence import Sequence, SequenceStatus
from deepseek_serve.engine.types import SamplingParams

SHAPE = gpu.SHAPES["r1-distill-qwen-1.5b"]
DECODERS, LONG_PROMPT, MAX_LEN = 63, 8000, 8448
# (BLOCK_M, BLOCK_N, num_warps, num_stages) of the chunk attention kernel
TILES = ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 3))


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def device_ms(fn: Any, reps: int = 20) -> float:
    """Median device time of fn() in ms (CUDA events around each call, after 3 warm calls)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return pct(times, 0.5)


def kernel_tiles(out: dict[str, Any], best_tile: bool) -> None:
    """One layer's chunk attention: 449 tokens (padded to 512) at position 7,000 of slot 63."""
    h, hk = SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"]
    d = SHAPE["hidden_size"] // h
    start, count, size = 7000, 449, 512
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, size, h, d, dtype=torch.bfloat16, device="cuda", generator=gen)
    kv = torch.randn(DECODERS + 1, hk, MAX_LEN + 1, 2 * d, dtype=torch.bfloat16, device="cuda", generator=gen)
    flops = 4 * h * d * sum(start + i + 1 for i in range(count))
    rows = []
    default = (ca.BLOCK_M, ca.BLOCK_N, ca.NUM_WARPS, ca.NUM_STAGES)
    for tile in TILES:
        ca.BLOCK_M, ca.BLOCK_N, ca.NUM_WARPS, ca.NUM_STAGES = tile
        packing.BLOCK_M = tile[0]  # the query blocks of the table follow the kernel's
        layout = packing.PackLayout(size, 1)
        host = layout.pack([packing.Segment([0] * count, DECODERS, start)])
        blocks = layout.views(host.cuda())[1]
        ms = device_ms(lambda blocks=blocks: ca.chunk_attention(q, kv, blocks))
        splits = ca.kv_splits(size, h, kv.shape[2], q.device)
        rows.append({"tile": tile, "ms": ms, "tflops": flops / ms / 1e9, "splits": splits})
        gpu.log(f"chunk attention tile {tile}: {ms * 1e3:.1f} us, {flops / ms / 1e9:.0f} TFLOP/s, {splits} KV splits")
    ca.BLOCK_M, ca.BLOCK_N, ca.NUM_WARPS, ca.NUM_STAGES = default
    packing.BLOCK_M = default[0]
    if best_tile:
        best = min(rows, key=lambda r: r["ms"])["tile"]
        ca.BLOCK_M, ca.BLOCK_N, ca.NUM_WARPS, ca.NUM_STAGES = best
        packing.BLOCK_M = best[0]
        gpu.log(f"chunk attention tile for the runs below: {best} (default {default})")
    out["kernel_tile_used"] = (ca.BLOCK_M, ca.BLOCK_N, ca.NUM_WARPS, ca.NUM_STAGES)
    # the eager path's attention: the slot's positions gathered (a copy), KV heads repeated, SDPA
    ms = device_ms(lambda: attend_causal(q[:, :count], kv[DECODERS : DECODERS + 1, :, : start + count].clone(), hk))
    gpu.log(f"SDPA causal (slot gathered, KV heads repeated): {ms * 1e3:.1f} us")
    out["kernel"] = {"tiles": rows, "sdpa_ms": ms, "flops": flops}


def graph_replays(runner: Any, out: dict[str, Any]) -> None:
    """Device time of one packed graph replay (one segment) per size at position 7,000 of the last slot."""
    rows = []
    assert runner.chunk_graphs is not None
    for size in (64, 128, 256, 384, 512):
        ids = list(range(1, size + 1))
        segments = [packing.Segment(ids, DECODERS, 7000)]
        ms = device_ms(lambda segments=segments: runner.chunk_graphs.replay(segments))
        rows.append({"tokens": size, "ms": ms})
        gpu.log(f"chunk graph {size} tokens at position 7000: {ms:.3f} ms")
    out["chunk_graph_ms"] = rows


def step(runner: Any, batch: list[ScheduledSeq]) -> float:
    t0 = time.perf_counter()
    results = runner.step(batch)
    dt = time.perf_counter() - t0
    for e, r in zip(batch, results, strict=True):
        if r is not None:
            e.seq.output_token_ids.append(r.token_id)
    return dt


def use_path(runner: Any, path: str, graphs: Any) -> None:
    runner.chunk_graphs = graphs if path == "graph" else None
    runner._chunk_attention = path != "sdpa"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--chunks", default="256,512,f192", help="DS_LONG_PREFILL_TOKENS values; fN: N prompt tokens")
    ap.add_argument("--paths", default="graph,eager,sdpa", help="the first path runs every chunk size, others 512")
    ap.add_argument("--best-tile", action="store_true", help="run with the fastest tile of the kernel timing")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu.LOG_FILE = out / "log.txt"
    results: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "rows": []}
    kernel_tiles(results, a.best_tile)
    hf = gpu.hf_model(SHAPE, torch.bfloat16, seed=0)
    runner = gpu.our_runner(hf, SHAPE, torch.bfloat16, slots=DECODERS + 1, max_len=MAX_LEN)
    del hf
    t0 = time.perf_counter()
    graphs = runner.warmup(512)
    gpu.log(f"{graphs} graphs captured in {time.perf_counter() - t0:.1f} s")
    chunk_graphs = runner.chunk_graphs
    with torch.inference_mode():  # the graphs' inputs are inference tensors
        graph_replays(runner, results)
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
    paths = a.paths.split(",")
    runs = [(paths[0], c) for c in a.chunks.split(",")] + [(p, "512") for p in paths[1:]]
    for path, spec in runs:
        chunk = int(spec.lstrip("f"))
        prompt_chunk = chunk if spec.startswith("f") else prompt_chunk_cap(DECODERS, 512, chunk)
        use_path(runner, path, chunk_graphs)
        # a new prompt per run: the last one's KV stays in the prefix cache
        long_prompt = torch.randint(0, SHAPE["vocab_size"], (LONG_PROMPT,), generator=gen).tolist()
        steady = [step(runner, [ScheduledSeq(s, 1, True) for s in decoders]) for _ in range(64)]
        long = Sequence(f"long-{path}-{spec}", long_prompt, params, 1, 1e9)
        runner.allocate(long)
        during = []
        while long.is_prefilling:
            n = min(prompt_chunk, long.num_prompt_tokens - long.num_computed_tokens)
            batch = [ScheduledSeq(s, 1, True) for s in decoders]
            batch.append(ScheduledSeq(long, n, long.num_computed_tokens + n == long.num_prompt_tokens))
            during.append(step(runner, batch))
        runner.free(long)
        base = pct(steady, 0.5)
        row = {
            "path": path,
            "chunk_tokens": spec,
            "prompt_chunk": prompt_chunk,
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
    use_path(runner, "graph", chunk_graphs)
    (out / "chunked.json").write_text(json.dumps(results, indent=2))
    gpu.log(
        "\n| path | DS_LONG_PREFILL_TOKENS | prompt tokens / step | steps | steady ms | p50 / p99 / max ms | "
        "p99 / steady | prefill s |"
    )
    gpu.log("|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        gpu.log(
            f"| {r['path']} | {r['chunk_tokens']} | {r['prompt_chunk']} | {r['steps_during_prefill']} | "
            f"{r['steady_ms']:.2f} | {r['during_p50_ms']:.2f} / {r['during_p99_ms']:.2f} / "
            f"{r['during_max_ms']:.2f} | {r['p99_over_steady']:.2f} | {r['prefill_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
