"""Weight-only int8 / int4 on the GPU: per-linear kernel timings and the decode step, bf16 side by side.

Run on a CUDA machine from the repository root:
    PYTHONPATH=src python3 bench/gpu_quant.py [--out DIR] [--skip-linears] [--variants a,b]

1. linears of the DeepSeek-R1-Distill-Qwen-1.5B shape (qkv, o, gate_up, down, LM head) at M = 1, 2, 8,
   64, 128 rows: bf16 cuBLAS, int8 (Triton `w8_mm`, dequantize + cuBLAS, aten `_weight_int8pack_mm`
   where CUDA has it), int4 (Triton `w4_mm` and aten tinygemm, groups of 32 and 128). Device time per
   call from CUDA-graph replays of 20 calls over enough weight copies to defeat the L2 cache; GB/s of
   weight bytes read;
2. per variant (bf16, int8, int4 ...): random bf16 weights of the 1.5B shape, the runner with compiled
   decode steps and CUDA graphs: graph replay time at 1 and 64 rows, then tokens/s of 1 and 64 greedy
   streams (128-token prompts, 128 new tokens), with the copy-bandwidth roofline of each variant.
Writes quant.json and log.txt under --out (default: $OUT or ./bench-out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import gpu  # bench/gpu.py: shapes, random models, the runner driver
from deepseek_serve.engine.runners.pytorch.quantize import (
    INT4_INNER_K_TILES,
    INT8_ONE_ROW,
    pack_int4,
    quantize_int4,
    quantize_int8,
    weight_bytes,
)

DEVICE = torch.device("cuda")
SHAPE = gpu.SHAPES["r1-distill-qwen-1.5b"]
LINEARS = gpu.linears(SHAPE)  # name: (K, N)
ROWS = (1, 8, 64, 128)
L2_DEFEAT_BYTES = 256 << 20
VARIANTS: dict[str, dict[str, Any]] = {
    "bf16": dict(quant="none"),
    "int8": dict(quant="int8"),
    "int8-triton-1row": dict(quant="int8", int8_one_row="triton"),
    "int4-triton-g128": dict(quant="int4", group=128, kernel="triton"),
    "int4-triton-g32": dict(quant="int4", group=32, kernel="triton"),
    "int4-tinygemm-g128": dict(quant="int4", group=128, kernel="tinygemm"),
    "int4-tinygemm-g32": dict(quant="int4", group=32, kernel="tinygemm"),
}


def graph_time_us(fns: list[Callable[[], Any]], reps: int = 20) -> float:
    """Device µs per call: `reps` rounds over `fns` (one per weight copy) captured in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    per_round = max(1, reps // len(fns))
    with torch.cuda.graph(g):
        for _ in range(per_round):
            for f in fns:
                f()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / (per_round * len(fns)))
    return sorted(times)[2]


def bench_linears(results: dict[str, Any], names: list[str]) -> None:
    from deepseek_serve.engine.runners.pytorch import quant_kernels

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rows = []
    for name in names:
        k, n = LINEARS[name]
        copies = max(2, min(32, math.ceil(L2_DEFEAT_BYTES / (n * k))))
        ws = [torch.randn(n, k, device=DEVICE, generator=gen, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        q8 = [quantize_int8(w) for w in ws]
        q8 = [(q, s.to(torch.bfloat16)) for q, s in q8]
        q4: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        for group in (32, 128):
            q4[group] = []
            for w in ws:
                codes, sz = quantize_int4(w, group)
                packed_u8 = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
                tiny = torch.ops.aten._convert_weight_to_int4pack(packed_u8, INT4_INNER_K_TILES)
                q4[group].append((pack_int4(codes, group), tiny, sz.to(torch.bfloat16)))
        for m in ROWS:
            x = torch.randn(m, k, device=DEVICE, generator=gen, dtype=torch.bfloat16)
            row: dict[str, Any] = {"linear": name, "K": k, "N": n, "M": m}
            kernels: dict[str, tuple[list[Callable[[], Any]], float]] = {
                "bf16": ([lambda w=w, x=x: F.linear(x, w) for w in ws], 2.0),
                "int8_triton": ([lambda q=q, s=s, x=x: quant_kernels.w8_mm(x, q, s) for q, s in q8], 1.0),
                "int8_dequant_cublas": ([lambda q=q, s=s, x=x: F.linear(x, q.to(x.dtype)) * s for q, s in q8], 1.0),
                "int8_aten": ([lambda q=q, s=s, x=x: torch.ops.aten._weight_int8pack_mm(x, q, s) for q, s in q8], 1.0),
            }
            for group in (32, 128):
                extra = 4 / group  # bf16 scale + zero per group, per weight
                kernels[f"int4_triton_g{group}"] = (
                    [lambda p=p, sz=sz, g=group, x=x: quant_kernels.w4_mm(x, p, sz, g) for p, _, sz in q4[group]],
                    0.5 + extra,
                )
                kernels[f"int4_tinygemm_g{group}"] = (
                    [
                        lambda t=t, sz=sz, g=group, x=x: torch.ops.aten._weight_int4pack_mm(x, t, g, sz)
                        for _, t, sz in q4[group]
                    ],
                    0.5 + extra,
                )
            for kname, (fns, bytes_per_weight) in kernels.items():
                try:
                    us = graph_time_us(fns)
                    row[kname] = round(us, 2)
                    row[f"{kname}_GBps"] = round(n * k * bytes_per_weight / us / 1e3, 0)
                except Exception as exc:  # a kernel missing on this build must not stop the others
                    row[kname] = f"error: {exc!r}"[:200]
            gpu.log(json.dumps(row))
            rows.append(row)
        del ws, q8, q4
        torch.cuda.empty_cache()
    results["linears"] = rows


def bench_variant(vname: str, hf: torch.nn.Module, bw: float, results: dict[str, Any]) -> None:
    opts = VARIANTS[vname]
    kernels = dict(
        int8_one_row=opts.get("int8_one_row", INT8_ONE_ROW),  # the library default unless a variant says
        int4_kernel=opts.get("kernel", "triton"),
        group_size=opts.get("group", 32),
    )
    torch._dynamo.reset()
    row: dict[str, Any] = {"variant": vname}
    t0 = time.perf_counter()
    runner = gpu.our_runner(
        hf, SHAPE, torch.bfloat16, slots=64, max_len=256, quant=opts["quant"], quant_options=kernels
    )
    wbytes = weight_bytes(runner.model)
    row["weight_GB"] = wbytes / 1e9
    row["roofline_tok_s_1"] = bw / wbytes
    with torch.inference_mode():
        for n in (1, 64):
            assert runner.graphs is not None
            g = runner.graphs.get(n, 256)
            g.inputs[0].random_(0, SHAPE["vocab_size"])
            g.inputs[1].fill_(128)
            g.inputs[2].fill_(128)
            row[f"replay_ms_{n}"] = gpu.replay_ms(g)
    runner.warmup()
    row["compile_capture_s"] = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(7)
    for conc in (1, 64):
        prompts = [torch.randint(0, SHAPE["vocab_size"], (128,), generator=gen).tolist() for _ in range(conc)]
        gpu.bench_runner(runner, prompts, 2)
        r = gpu.bench_runner(runner, prompts, 128)
        row[f"decode_tok_s_{conc}"] = r["decode_tok_s"]
    row["roofline_pct_1"] = 100 * row["decode_tok_s_1"] / row["roofline_tok_s_1"]
    # greedy tokens of one fixed prompt (compared with bf16's in the table)
    p = torch.randint(0, SHAPE["vocab_size"], (128,), generator=torch.Generator().manual_seed(9)).tolist()
    seqs = gpu.make_seqs([p], 32)
    gpu.run_to_completion(runner, seqs, prefill_chunk=128)
    row["greedy_32"] = seqs[0].output_token_ids
    gpu.log(json.dumps({k: v for k, v in row.items() if k != "greedy_32"}))
    results.setdefault("variants", []).append(row)
    del runner
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--skip-linears", action="store_true")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--linears", default=",".join(LINEARS), help="linears of the kernel table")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu.LOG_FILE = out / "log.txt"
    gpu.PROMPT_LEN, gpu.NEW_TOKENS = 128, 128
    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    try:
        bw = gpu.copy_bandwidth()
        results["copy_bandwidth_GBps"] = bw / 1e9
        gpu.log(json.dumps(results))
        if not a.skip_linears:
            bench_linears(results, a.linears.split(","))
            (out / "quant.json").write_text(json.dumps(results, indent=2))
        hf = gpu.hf_model(SHAPE, torch.bfloat16, seed=0)
        for vname in [v for v in a.variants.split(",") if v]:
            try:
                bench_variant(vname, hf, bw, results)
            except Exception as exc:
                gpu.log(f"{vname} failed: {exc!r}"[:3000])
            (out / "quant.json").write_text(json.dumps(results, indent=2))
    finally:
        (out / "quant.json").write_text(json.dumps(results, indent=2))
    base = next((v for v in results.get("variants", []) if v["variant"] == "bf16"), None)
    gpu.log(
        "\n| variant | weights GB | replay ms 1 / 64 | tok/s 1 | x bf16 | % roofline | tok/s 64 | x bf16 "
        "| greedy = bf16 |"
    )
    gpu.log("|---|---|---|---|---|---|---|---|---|")
    for v in results.get("variants", []):
        x1 = v["decode_tok_s_1"] / base["decode_tok_s_1"] if base else float("nan")
        x64 = v["decode_tok_s_64"] / base["decode_tok_s_64"] if base else float("nan")
        same = (
            next((i for i, (p, q) in enumerate(zip(base["greedy_32"], v["greedy_32"], strict=False)) if p != q), 32)
            if base
            else -1
        )
        gpu.log(
            f"| {v['variant']} | {v['weight_GB']:.2f} | {v['replay_ms_1']:.3f} / {v['replay_ms_64']:.3f} | "
            f"{v['decode_tok_s_1']:.0f} | {x1:.2f} | {v['roofline_pct_1']:.0f} | {v['decode_tok_s_64']:.0f} | "
            f"{x64:.2f} | first {same}/32 |"
        )


if __name__ == "__main__":
    main()
