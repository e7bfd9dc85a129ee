"""One-row GEMV kernels (`gemv_kernels`) on the GPU: correctness, per-linear timings over a config grid,
and the one-stream decode step with the old and new kernels side by side.

Run on a CUDA machine from the repository root:
    PYTHONPATH=src:bench python3 bench/gpu_gemv.py [--out DIR] [--budget-s 300]

1. checks: each kernel (float / int8 / int4 g32 and g128, plain and with SiLU·up fused) on the
   1.5B shapes and odd small ones, bf16 and fp32, against float64 reference math;
2. linears of the DeepSeek-R1-Distill-Qwen-1.5B shape at one row (qkv, o, gate_up, down with SiLU·up,
   LM head): bf16 cuBLAS, int4 tinygemm (g32, g128), and the GEMV kernels over a grid of (BLOCK_N,
   BLOCK_K, num_warps) x SPLIT (int8 / int4: PTX bit-trick dequantization over the grid; CAST, BITS
   and PTX at the default tile); device µs per call from CUDA-graph replays over enough
   weight copies to defeat the L2 (`gpu_quant.graph_time_us`); the best config of each is used below;
3. decode variants on random bf16 weights of the 1.5B shape: old vs GEMV kernels for bf16 (fused
   SiLU·down), int8 (vs Inductor's one-row reduction) and int4 (vs tinygemm): the 1-row graph replay,
   the kernel count of the 1-row step, then one-stream decode tok/s (128-token prompt, 128 new tokens);
4. if time is left, Inductor's coordinate-descent-tuned reductions for the same linears.
Sections stop starting work past --budget-s; --decode-defaults runs the decode variants on
`default_config`'s tiles instead of the best measured ones. Writes gemv.json, log.txt and profiles.txt under --out.
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
from deepseek_serve.engine.runners.pytorch import gemv_kernels
from deepseek_serve.engine.runners.pytorch.gemv_kernels import GemvConfig
from deepseek_serve.engine.runners.pytorch.ops import silu_mul
from deepseek_serve.engine.runners.pytorch.quantize import (
    INT4_INNER_K_TILES,
    dequantize_int4,
    pack_int4,
    quantize_int4,
    quantize_int8,
    weight_bytes,
)
from gpu_quant import L2_DEFEAT_BYTES, graph_time_us

DEVICE = torch.device("cuda")
SHAPE = gpu.SHAPES["r1-distill-qwen-1.5b"]
LINEARS = {name: (k, n, name == "down") for name, (k, n) in gpu.linears(SHAPE).items()}  # + SiLU·up fused
# (BLOCK_N, BLOCK_K, num_warps) per kind; SPLIT is swept per linear (a runtime argument: no compile)
TILES: dict[str, list[tuple[int, int, int]]] = {
    "float": [(16, 256, 4), (32, 256, 4), (64, 128, 4), (64, 256, 8), (32, 512, 8), (128, 128, 8)],
    "int8": [(8, 256, 2), (16, 128, 2), (16, 256, 2), (16, 256, 4), (16, 512, 4), (32, 256, 4), (64, 512, 8)],
    "int4": [(8, 512, 2), (16, 512, 2), (16, 512, 4), (32, 256, 4), (32, 512, 4), (128, 256, 8), (32, 1024, 8)],
}
DEQUANTS = (gemv_kernels.PTX,)  # swept over the grid for the quantized kinds; all three at the default tile
SPLITS = (1, 2, 4, 8)
VARIANTS: dict[str, dict[str, Any]] = {  # quant, quantize_model options, DecodeStep's gemv_down; by priority
    "bf16": dict(quant="none", gemv_down=False),
    "bf16-gemv": dict(quant="none", gemv_down=True),
    "bf16-bias-apart": dict(quant="none", gemv_down=False, bias_apart=True),
    "int8-gemv": dict(quant="int8", opts=dict(int8_one_row="gemv"), gemv_down=True),
    "int4-gemv-g32": dict(quant="int4", opts=dict(int4_kernel="triton", group_size=32), gemv_down=True),
    "int8-inductor": dict(quant="int8", opts=dict(int8_one_row="inductor"), gemv_down=False),
    "int4-tinygemm-g32": dict(
        quant="int4", opts=dict(int4_kernel="tinygemm", group_size=32, int8_one_row="inductor"), gemv_down=False
    ),
    "int4-gemv-g128": dict(quant="int4", opts=dict(int4_kernel="triton", group_size=128), gemv_down=True),
}
T0 = time.perf_counter()
BUDGET_S = 300.0


def left() -> float:
    return BUDGET_S - (time.perf_counter() - T0)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def act(x: torch.Tensor, silu: bool) -> torch.Tensor:
    if not silu:
        return x
    gate, up = x.chunk(2, dim=-1)
    return (F.silu(gate.float()) * up.float()).to(x.dtype)


def call(kind: str, x: torch.Tensor, w: Any, silu: bool, group: int) -> torch.Tensor:
    if kind == "float":
        return gemv_kernels.gemv_float(x, w, silu)
    if kind == "int8":
        return gemv_kernels.gemv_int8(x, w[0], w[1], silu)
    return gemv_kernels.gemv_int4(x, w[0], w[1], group, silu)


# --- 1. checks -------------------------------------------------------------------------------------
def check(results: dict[str, Any]) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    # bf16 on the 1.5B shapes (the compiles the timings reuse), both dtypes on odd small ones
    big = [(1, k, n, silu, torch.bfloat16, 1e-2) for k, n, silu in LINEARS.values() if n < 100_000]
    small = [(m, k, n, silu) for m, k, n, silu in ((1, 320, 70, False), (3, 96, 33, True))]
    cases_all = big + [(*sh, dt, tol) for sh in small for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2))]
    errs: dict[str, float] = {}
    failed: list[str] = []
    for m, k, n, silu, dtype, tol in cases_all:
        x = torch.randn(m, 2 * k if silu else k, device=DEVICE, generator=gen).to(dtype)
        a = act(x, silu).double()
        w = torch.randn(n, k, device=DEVICE, generator=gen) * 0.02
        q, s = quantize_int8(w)
        s = s.to(dtype)
        cases: list[tuple[str, Any, int, torch.Tensor]] = [
            ("float", w.to(dtype), 0, w.to(dtype).double()),
            ("int8", (q, s), 0, q.double() * s.double()[:, None]),
        ]
        for group in (32, 128):
            if k % group == 0:
                codes, sz = quantize_int4(w, group)
                sz = sz.to(dtype)
                deq = dequantize_int4(codes, sz.float(), group).double()
                cases.append((f"int4_g{group}", (pack_int4(codes, group), sz), group, deq))
        for name, wk, group, w_ref in cases:
            key = f"{name}_{str(dtype)[6:]}_{m}x{k}x{n}{'_silu' if silu else ''}"
            try:
                out = gemv_kernels.gemv_finish(call(name.split("_")[0], x, wk, silu, group), torch.float64)
            except Exception as exc:  # reported, and the timings still run
                failed.append(f"{key}: {exc!r}"[:1000])
                continue
            errs[key] = err = rel_err(out, a @ w_ref.t())
            if not err < tol:
                failed.append(f"{key}: rel err {err:.2e} >= {tol}")
    results["checks"] = errs
    results["check_failures"] = failed
    for f in failed:
        gpu.log(f"CHECK FAILED {f}")
    gpu.log(
        f"checks: {len(failed)} failed, {len(errs)} compared; max rel err fp32 "
        f"{max((v for k, v in errs.items() if 'float32' in k), default=math.nan):.1e}, bf16 "
        f"{max((v for k, v in errs.items() if 'bfloat16' in k), default=math.nan):.1e}"
    )


# --- 2. linears ------------------------------------------------------------------------------------
def bench_linears(results: dict[str, Any]) -> dict[tuple[str, int, int, int], GemvConfig]:
    best: dict[tuple[str, int, int, int], GemvConfig] = {}
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    rows = []
    for name, (k, n, silu) in LINEARS.items():
        if left() < 110:
            gpu.log(f"linears: out of time before {name}")
            break
        row = bench_linear(name, k, n, silu, gen, best)
        gpu.log(json.dumps({kk: v for kk, v in row.items() if kk.startswith(("best", "default", "bf16", "int4_t"))}))
        rows.append(row)
        torch.cuda.empty_cache()
    results["linears"] = rows
    results["best_configs"] = {f"{k[0]} N={k[1]} K={k[2]} G={k[3]}": list(v) for k, v in best.items()}
    return best


def bench_linear(
    name: str, k: int, n: int, silu: bool, gen: torch.Generator, best: dict[tuple[str, int, int, int], GemvConfig]
) -> dict[str, Any]:
    copies = max(2, min(32, math.ceil(L2_DEFEAT_BYTES / (n * k))))
    ws = [torch.randn(n, k, device=DEVICE, generator=gen, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(1, 2 * k if silu else k, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    row: dict[str, Any] = {"linear": name, "K": k, "N": n, "silu": silu}
    weights: dict[str, list[Any]] = {"float": ws, "int8": []}
    for w in ws:
        q, s = quantize_int8(w)
        weights["int8"].append((q, s.to(torch.bfloat16)))
    tiny: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for group in (32, 128):
        weights[f"int4_g{group}"], tiny[group] = [], []
        for w in ws:
            codes, sz = quantize_int4(w, group)
            sz = sz.to(torch.bfloat16)
            weights[f"int4_g{group}"].append((pack_int4(codes, group), sz))
            packed_u8 = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
            try:
                tiny[group].append((torch.ops.aten._convert_weight_to_int4pack(packed_u8, INT4_INNER_K_TILES), sz))
            except RuntimeError as exc:  # tinygemm missing on this build: its column says so
                row[f"int4_tinygemm_g{group}_error"] = repr(exc)[:200]

    def timed(key: str, fns: list[Callable[[], Any]], bytes_per_weight: float) -> float:
        try:
            us = graph_time_us(fns)
        except Exception as exc:  # a kernel missing on this build must not stop the others
            row[key] = f"error: {exc!r}"[:200]
            return float("inf")
        row[key] = round(us, 2)
        row[f"{key}_GBps"] = round(n * k * bytes_per_weight / us / 1e3)
        return us

    # the unfused paths of the down projection include their SiLU·up kernel; the GEMV kernels are
    # timed alone (their partial sums are summed by the next kernel of the decode step)
    timed("bf16_cublas", [lambda w=w: F.linear(act(x, silu), w) for w in ws], 2.0)
    for group in (32, 128):
        timed(
            f"int4_tinygemm_g{group}",
            [
                lambda t=t, sz=sz, g=group: torch.ops.aten._weight_int4pack_mm(act(x, silu), t, g, sz)
                for t, sz in tiny[group]
            ],
            0.5 + 4 / group,
        )
    for wname, bpw in (("float", 2.0), ("int8", 1.0), ("int4_g32", 0.625), ("int4_g128", 0.53125)):
        kind = wname.split("_")[0]
        group = int(wname[6:]) if kind == "int4" else 0
        key = (kind, n, k, group)
        default = gemv_kernels.default_config(kind, n, k, group)  # type: ignore[arg-type]
        cands = [default]
        modes = DEQUANTS if kind != "float" else (default.dequant,)
        if kind != "float":
            cands += [default._replace(dequant=d) for d in (gemv_kernels.CAST, gemv_kernels.BITS, gemv_kernels.PTX)]
        if wname != "int4_g128":
            for bn, bk, warps in TILES[kind]:
                if bk % max(group, 1) == 0:
                    cands += [GemvConfig(bn, bk, sp, warps, d) for d in modes for sp in SPLITS if k // bk >= sp]
        timings: list[tuple[float, GemvConfig]] = []
        for cfg in dict.fromkeys(cands):
            gemv_kernels.OVERRIDES[key] = cfg
            try:
                mode = "" if kind == "float" else f"_{gemv_kernels.DEQUANT_NAMES[cfg.dequant]}"
                us = timed(
                    f"gemv_{wname}_{cfg.block_n}x{cfg.block_k}_s{cfg.split}_w{cfg.num_warps}{mode}",
                    [lambda w=w, kind=kind, group=group: call(kind, x, w, silu, group) for w in weights[wname]],
                    bpw,
                )
            finally:
                gemv_kernels.OVERRIDES.pop(key, None)
            timings.append((us, cfg))
        us, cfg = min(timings)
        best[key] = cfg
        row[f"best_{wname}"] = [round(us, 2), list(cfg)]
        row[f"best_{wname}_GBps"] = round(n * k * bpw / us / 1e3)
        row[f"default_{wname}"] = timings[0][0]
        if kind != "float":
            for d in (gemv_kernels.CAST, gemv_kernels.BITS, gemv_kernels.PTX):
                us_d = next(t for t, c in timings if c == default._replace(dequant=d))
                row[f"default_{gemv_kernels.DEQUANT_NAMES[d]}_{wname}"] = us_d
            for d in (gemv_kernels.CAST, gemv_kernels.BITS, gemv_kernels.PTX):
                dt = [(t, c) for t, c in timings if c.dequant == d]
                row[f"best_{gemv_kernels.DEQUANT_NAMES[d]}_{wname}"] = [round(min(dt)[0], 2), list(min(dt)[1])]
    return row


def bench_inductor(results: dict[str, Any]) -> None:
    """Inductor's coordinate-descent-tuned one-row reductions (the old bf16 / int8 one-row path)."""
    import torch._inductor.config as icfg

    icfg.coordinate_descent_tuning = True
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    out: dict[str, Any] = {}
    for name in ("down", "gate_up", "lm_head", "qkv", "o"):
        if left() < 25:
            break
        inductor_linear(name, gen, out)
        gpu.log(json.dumps({kk: v for kk, v in out.items() if kk.startswith(name)}))
    results["inductor"] = out


def inductor_linear(name: str, gen: torch.Generator, out: dict[str, Any]) -> None:
    k, n, silu = LINEARS[name]
    copies = max(2, min(32, math.ceil(L2_DEFEAT_BYTES / (n * k))))
    ws = [torch.randn(n, k, device=DEVICE, generator=gen, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(1, 2 * k if silu else k, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    q8 = [(q, s.to(torch.bfloat16)) for q, s in (quantize_int8(w) for w in ws)]

    def f16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(silu_mul(x) if silu else x, w)

    def f8(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return F.linear(silu_mul(x) if silu else x, q.to(x.dtype)) * s

    cases: list[tuple[str, Callable[..., Any], list[Any], float]] = [
        ("bf16", f16, [(w,) for w in ws], 2.0),
        ("int8", f8, q8, 1.0),
    ]
    for kname, fn, args, bpw in cases:
        if left() < 15:
            break
        c = torch.compile(fn, dynamic=False, fullgraph=True)
        try:
            us = graph_time_us([lambda a=a, c=c: c(x, *a) for a in args])
            out[f"{name}_{kname}"] = round(us, 2)
            out[f"{name}_{kname}_GBps"] = round(n * k * bpw / us / 1e3)
        except Exception as exc:
            out[f"{name}_{kname}"] = f"error: {exc!r}"[:200]


# --- 3. decode -------------------------------------------------------------------------------------
def bench_variants(results: dict[str, Any], names: list[str], out: Path) -> None:
    """Per variant (in priority order, while time is left): compile + capture the 1-row step, its replay
    time and kernel profile, then one-stream decode tok/s and 32 greedy tokens of a fixed prompt."""
    hf = gpu.hf_model(SHAPE, torch.bfloat16, seed=0)
    prompt = torch.randint(0, SHAPE["vocab_size"], (128,), generator=torch.Generator().manual_seed(7)).tolist()
    rows: list[dict[str, Any]] = []
    for vname in names:
        if left() < 40:
            gpu.log(f"decode: out of time before {vname}")
            break
        row: dict[str, Any] = {"variant": vname}
        try:
            bench_variant(vname, hf, prompt, row, results["copy_bandwidth_GBps"] * 1e9, out)
        except Exception as exc:
            row["error"] = repr(exc)[:2000]
        gpu.log(json.dumps({k: v for k, v in row.items() if k != "greedy_32"}))
        rows.append(row)
        results["variants"] = rows
        (out / "gemv.json").write_text(json.dumps(results, indent=2))
        torch.cuda.empty_cache()


def bench_variant(
    vname: str, hf: torch.nn.Module, prompt: list[int], row: dict[str, Any], bw: float, out: Path
) -> None:
    from deepseek_serve.engine.runners.pytorch.compile import DecodeStep

    v = VARIANTS[vname]
    kv = 256
    torch._dynamo.reset()
    t0 = time.perf_counter()
    runner = gpu.our_runner(
        hf, SHAPE, torch.bfloat16, slots=1, max_len=256, quant=v["quant"], quant_options=v.get("opts")
    )
    runner.decode_step = DecodeStep(
        runner.model, compiler=runner.compiler, gemv_down=v["gemv_down"], bias_apart=v.get("bias_apart", False)
    )
    wbytes = weight_bytes(runner.model)
    row["weight_GB"] = wbytes / 1e9
    row["roofline_tok_s"] = bw / wbytes
    with torch.inference_mode():
        assert runner.graphs is not None
        g = runner.graphs.get(1, kv)
        g.inputs[0].random_(0, SHAPE["vocab_size"])
        g.inputs[1].fill_(128)
        g.inputs[2].fill_(128)
        row["replay_ms_1"] = gpu.replay_ms(g)
    row["compile_capture_s"] = time.perf_counter() - t0
    row["replay_roofline_pct"] = 100 * 1e3 / row["replay_ms_1"] / row["roofline_tok_s"]
    table, dev_us, nk = gpu.profile_step(runner, 1, kv)
    row["profile_device_us_1"], row["kernels_1"] = dev_us, nk
    with (out / "profiles.txt").open("a") as f:
        f.write(f"\n== {vname}: {dev_us:.1f} us of kernels, {nk} kernels per 1-row step\n{table}\n")
    gpu.log(f"{vname} kernels per 1-row step:\n" + "\n".join(table.splitlines()[:14]))
    if left() < 25:
        return
    gpu.bench_runner(runner, [prompt], 128)  # the prefill chunk graph and every decode bucket captured
    row["decode_tok_s_1"] = gpu.bench_runner(runner, [prompt], 128)["decode_tok_s"]
    seqs = gpu.make_seqs([prompt], 32)
    gpu.run_to_completion(runner, seqs, prefill_chunk=128)
    row["greedy_32"] = seqs[0].output_token_ids


def report(results: dict[str, Any]) -> None:
    lin = results.get("linears", [])
    if lin:
        gpu.log(
            "\n| linear (K x N) | bf16 cuBLAS | Inductor bf16 / int8 | gemv bf16 | gemv int8 | tinygemm g32 / g128 "
            "| gemv int4 g32 / g128 | default tile int8 cast / bits / ptx | default tile int4 g32 cast / bits / ptx |"
        )
        gpu.log("|---|---|---|---|---|---|---|---|---|")
        ind = results.get("inductor", {})
        for r in lin:
            nm = r["linear"]

            def b(key: str, r: dict[str, Any] = r) -> str:
                v = r.get(f"best_{key}")
                return f"{v[0]:.1f} ({r[f'best_{key}_GBps']} GB/s) {v[1]}" if v else "-"

            def d(key: str, r: dict[str, Any] = r) -> str:
                return " / ".join(f"{r.get(f'default_{m}_{key}', math.nan):.1f}" for m in gemv_kernels.DEQUANT_NAMES)

            gpu.log(
                f"| {nm} {r['K']} x {r['N']} | {r.get('bf16_cublas')} | {ind.get(f'{nm}_bf16', '-')} / "
                f"{ind.get(f'{nm}_int8', '-')} | {b('float')} | {b('int8')} | {r.get('int4_tinygemm_g32')} / "
                f"{r.get('int4_tinygemm_g128')} | {b('int4_g32')} / {b('int4_g128')} | {d('int8')} | {d('int4_g32')} |"
            )
    variants = results.get("variants", [])
    if variants:
        base = next((v for v in variants if v["variant"] == "bf16"), None)
        gpu.log(
            "\n| variant | weights GB | replay ms 1 | x bf16 | % roofline | kernels | tok/s 1 | x bf16 "
            "| greedy = bf16 |"
        )
        gpu.log("|---|---|---|---|---|---|---|---|---|")
        for v in variants:
            if "replay_ms_1" not in v:
                continue
            xr = base["replay_ms_1"] / v["replay_ms_1"] if base and "replay_ms_1" in base else float("nan")
            tok = v.get("decode_tok_s_1", float("nan"))
            xt = tok / base["decode_tok_s_1"] if base and "decode_tok_s_1" in base else float("nan")
            same = "-"
            if base and "greedy_32" in base and "greedy_32" in v:
                pairs = zip(base["greedy_32"], v["greedy_32"], strict=False)
                same = f"first {next((i for i, (p, q) in enumerate(pairs) if p != q), 32)}/32"
            gpu.log(
                f"| {v['variant']} | {v['weight_GB']:.2f} | {v['replay_ms_1']:.3f} | {xr:.2f} | "
                f"{v['replay_roofline_pct']:.1f} | {v.get('kernels_1', '-')} | {tok:.0f} | {xt:.2f} | {same} |"
            )


def main() -> None:
    global BUDGET_S
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="start nothing new after this many seconds")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--skip-linears", action="store_true")
    ap.add_argument(
        "--decode-defaults", action="store_true", help="decode variants on default_config, not the measured best"
    )
    a = ap.parse_args()
    BUDGET_S = a.budget_s
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu.LOG_FILE = out / "log.txt"
    torch.manual_seed(0)
    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    try:
        results["copy_bandwidth_GBps"] = gpu.copy_bandwidth() / 1e9
        gpu.log(json.dumps(results))
        check(results)
        gpu.log(f"checks done at {time.perf_counter() - T0:.0f} s")
        if not a.skip_linears:
            best = bench_linears(results)
            if not a.decode_defaults:
                gemv_kernels.OVERRIDES.update(best)  # the decode variants run the measured best configs
            gpu.log(f"linears done at {time.perf_counter() - T0:.0f} s")
            (out / "gemv.json").write_text(json.dumps(results, indent=2))
        bench_variants(results, [v for v in a.variants.split(",") if v], out)
        gpu.log(f"decode done at {time.perf_counter() - T0:.0f} s")
        bench_inductor(results)
    finally:
        (out / "gemv.json").write_text(json.dumps(results, indent=2))
        report(results)


if __name__ == "__main__":
    main()
