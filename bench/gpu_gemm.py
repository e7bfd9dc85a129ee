"""Weight-only int8 / int4 GEMM kernels for 2..128 rows on the GPU: checks, a tile sweep, decode.

Run on a CUDA machine from the repository root:
    PYTHONPATH=src:bench python3 bench/gpu_gemm.py [--out DIR] [--variants a,b] [--budget-s S]

1. checks, in worker processes (which also compile every swept config into Triton's cache): each
   config of the sweep against reference math in bf16 at its row bucket and on an odd shape (rows,
   N and K tails), the float32 tile in float32;
2. sweep: the linears of the DeepSeek-R1-Distill-Qwen-1.5B shape at 16, 32, 64, 128 rows: bf16 cuBLAS,
   the previous kernels (bench/old_quant_kernels.py when present: the prior `quant_kernels.py` with its
   ops renamed), and each tile config of `w8_launch` / `w4_launch` (int4 in groups of 32 and 128);
   then K splits on the best config of the linears with few tiles. Device µs per call from CUDA-graph
   replays over weight copies that defeat the L2 (gpu_quant.graph_time_us);
3. the best config per (M bucket, shape class) goes into quant_kernels' tables (printed as Python),
   then gpu_quant's decode variants run with them: tok/s at 1 and 64 streams.
Fixed seeds. Writes gemm.json and log.txt under --out (default: $OUT or ./bench-out).
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures as cf
import importlib
import json
import math
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from deepseek_serve.engine.runners.pytorch import quant_kernels as qk
from deepseek_serve.engine.runners.pytorch.quant_kernels import TileConfig
from deepseek_serve.engine.runners.pytorch.quantize import dequantize_int4, pack_int4, quantize_int4, quantize_int8

DEVICE = torch.device("cuda")
ROWS = (16, 32, 64, 128)
GROUPS = (32, 128)
SPLITS = (1, 2, 3, 4, 6, 8, 12)
L2_DEFEAT_BYTES = 256 << 20
T0 = time.perf_counter()


def w8_sweep(bm: int) -> list[TileConfig]:
    """Tile configs of the int8 sweep for row tile `bm`: mostly the bit-trick dequantization (fast)."""
    cfgs = [
        TileConfig(bm, 64, 128, 4, 4, fast=True),
        TileConfig(bm, 128, 128, 4, 4, fast=True),
        TileConfig(bm, 128, 256, 4, 3, fast=True),
        TileConfig(bm, 128, 128, 8, 4, fast=True),
        TileConfig(bm, 256, 128, 8, 3, fast=True),
        TileConfig(bm, 64, 256, 4, 4, fast=True),
        TileConfig(bm, 128, 128, 4, 5, fast=True),
        TileConfig(bm, 128, 128, 4, 4, swap=False, fast=True),
        TileConfig(bm, 128, 128, 4, 4),
        TileConfig(bm, 128, 128, 4, 4, swap=False),
    ]
    if bm == 128:
        cfgs.append(TileConfig(64, 128, 128, 4, 4, fast=True))
    return cfgs


def w4_sweep(bm: int, group: int) -> list[TileConfig]:
    """Tile configs of the int4 sweep for row tile `bm` and `group` (K tiles rounded up to the group)."""
    cfgs = [
        TileConfig(bm, 64, 128, 4, 4, fast=True),
        TileConfig(bm, 128, 128, 4, 4, fast=True),
        TileConfig(bm, 128, 256, 4, 3, fast=True),
        TileConfig(bm, 128, 128, 8, 4, fast=True),
        TileConfig(bm, 256, 128, 8, 3, fast=True),
        TileConfig(bm, 128, 64, 4, 4, fast=True) if group == 32 else TileConfig(bm, 256, 256, 8, 3, fast=True),
        TileConfig(bm, 128, 128, 4, 4, swap=False, fast=True),
        TileConfig(bm, 128, 128, 4, 4),
        TileConfig(bm, 128, 128, 4, 4, swap=False),
    ]
    if bm == 128:
        cfgs.append(TileConfig(64, 128, 128, 4, 4, fast=True))
    return [c._replace(bk=max(c.bk // group, 1) * group) for c in cfgs]


def log(msg: str) -> None:
    line = f"[{time.perf_counter() - T0:6.1f}s] {msg}"
    print(line, flush=True)
    if LOG_FILE is not None:
        with LOG_FILE.open("a") as f:
            f.write(line + "\n")


LOG_FILE: Path | None = None


# --- 1. checks (worker processes) -------------------------------------------------------------------
def check_one(kind: str, cfg: TileConfig, group: int, dtype_name: str, m: int, n: int, k: int) -> dict[str, Any]:
    """One launch against reference math; compiles the config (worker side). kind: w8 | w4."""
    t = time.perf_counter()
    row: dict[str, Any] = dict(kind=kind, cfg=list(cfg), group=group, dtype=dtype_name, m=m, n=n, k=k)
    try:
        dtype = getattr(torch, dtype_name)
        gen = torch.Generator(device=DEVICE).manual_seed(m * 7 + n + k)
        w = torch.randn(n, k, device=DEVICE, generator=gen)
        x = torch.randn(m, k, device=DEVICE, generator=gen).to(dtype)
        if kind == "w8":
            q, s = quantize_int8(w)
            ref = x.float() @ (q.float() * s[:, None]).t()
            out = qk.w8_launch(x, q, s.to(dtype), cfg)
        else:
            codes, sz = quantize_int4(w, group)
            sz = sz.to(dtype)
            ref = x.float() @ dequantize_int4(codes, sz.float(), group).t()
            out = qk.w4_launch(x, pack_int4(codes, group), sz, group, cfg)
        torch.cuda.synchronize()
        row["rel_err"] = ((out.float() - ref).norm() / ref.norm()).item()
        row["counters_zero"] = int(qk._counters(DEVICE).abs().sum()) == 0
    except Exception as exc:  # a config that does not compile must not stop the others
        row["error"] = f"{exc!r}"[:400]
    row["s"] = round(time.perf_counter() - t, 2)
    return row


BAD: set[str] = set()  # configs that failed a check: left out of the sweep


def config_key(kind: str, group: int, cfg: TileConfig) -> str:
    """The sweep's name of a config: "w8 (...)" or "w4g32 (...)"."""
    return f"{kind if kind == 'w8' else f'w4g{group}'} {tuple(cfg)}"


def check_tasks() -> list[tuple[Any, ...]]:
    tasks: list[tuple[Any, ...]] = []
    for m in ROWS:
        odd_m = m - 3
        for cfg in w8_sweep(m):
            tasks.append(("w8", cfg, 0, "bfloat16", m, 512, 1536))  # the sweep's specialization
            if cfg.fast:  # the configs a table may take: rows, N and K tails (and decode's odd rows)
                tasks.append(("w8", cfg, 0, "bfloat16", odd_m, 208, 1600))
        for group in GROUPS:
            for cfg in w4_sweep(m, group):
                tasks.append(("w4", cfg, group, "bfloat16", m, 512, 1536))
                if cfg.fast:
                    tasks.append(("w4", cfg, group, "bfloat16", odd_m, 208, 13 * 128))
    tasks.append(("w8", qk.FP32_CONFIG, 0, "float32", 5, 70, 640))
    for group in GROUPS:
        tasks.append(("w4", qk.FP32_CONFIG, group, "float32", 5, 70, 640))
    # forced odd split (the last-arrival sum)
    for fast in (False, True):
        split5 = TileConfig(16, 128, 128, 4, 4, split=5, fast=fast)
        tasks.append(("w8", split5, 0, "bfloat16", 9, 256, 8960))
        tasks.append(("w4", split5, 32, "bfloat16", 9, 256, 8960))
    return tasks


def run_checks(results: dict[str, Any], workers: int) -> None:
    tasks = check_tasks()
    log(f"checks: {len(tasks)} launches in {workers} workers")
    rows: list[dict[str, Any]] = []
    try:
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            for row in pool.map(check_one, *zip(*tasks, strict=True)):
                rows.append(row)
    except Exception as exc:
        log(f"worker pool failed after {len(rows)} checks: {exc!r}")
        if not rows:  # no pool at all: check (and compile) in this process
            rows = [check_one(*t) for t in tasks]
    bad = [r for r in rows if "error" in r or r["rel_err"] > 1e-2 or not r["counters_zero"]]
    for r in bad:
        BAD.add(config_key(r["kind"], r["group"], TileConfig(*r["cfg"])))
    for r in bad:
        log("CHECK FAILED " + json.dumps(r))
    errs = [r["rel_err"] for r in rows if "rel_err" in r]
    log(f"checks: {len(rows) - len(bad)}/{len(rows)} ok, max rel err {max(errs, default=float('nan')):.2e}")
    results["checks"] = rows


# --- 2. sweep -------------------------------------------------------------------------------------
def graph_time_us(fns: list[Callable[[], Any]], reps: int = 20) -> float:
    import gpu_quant

    return gpu_quant.graph_time_us(fns, reps)


def old_kernels() -> Any:
    try:
        return importlib.import_module("old_quant_kernels")
    except ImportError:
        return None


def launches(
    q8: list[tuple[torch.Tensor, torch.Tensor]],
    q4: dict[int, list[tuple[torch.Tensor, torch.Tensor]]],
    x: torch.Tensor,
    group: int,
    cfg: TileConfig,
) -> list[Callable[[], Any]]:
    """One call per weight copy: int8 (group 0) or int4 in `group`, through `cfg`."""
    if group == 0:
        return [lambda q=q, s=s: qk.w8_launch(x, q, s, cfg) for q, s in q8]
    return [lambda p=p, sz=sz: qk.w4_launch(x, p, sz, group, cfg) for p, sz in q4[group]]


def timed_us(fns: list[Callable[[], Any]]) -> float | str:
    try:
        return round(graph_time_us(fns), 2)
    except Exception as exc:  # a config that does not compile or run must not stop the others
        return f"error: {exc!r}"[:200]


def sweep(results: dict[str, Any], deadline: float) -> None:
    import gpu_quant  # not at the top: the check workers need none of its imports

    old = old_kernels()
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rows: list[dict[str, Any]] = results.setdefault("sweep", [])
    for name, (k, n) in gpu_quant.LINEARS.items():
        if time.perf_counter() > deadline:
            log(f"sweep: out of time before {name}")
            break
        copies = max(2, min(32, math.ceil(L2_DEFEAT_BYTES / (n * k))))
        ws = [torch.randn(n, k, device=DEVICE, generator=gen, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        q8 = [(q, s.to(torch.bfloat16)) for q, s in map(quantize_int8, ws)]
        q4: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for group in GROUPS:
            q4[group] = []
            for w in ws:
                codes, sz = quantize_int4(w, group)
                q4[group].append((pack_int4(codes, group), sz.to(torch.bfloat16)))
        for m in ROWS:
            x = torch.randn(m, k, device=DEVICE, generator=gen, dtype=torch.bfloat16)
            row: dict[str, Any] = {"linear": name, "K": k, "N": n, "M": m}
            timed: dict[str, tuple[list[Callable[[], Any]], float]] = {
                "bf16": ([lambda w=w, x=x: F.linear(x, w) for w in ws], 2.0)
            }
            if old is not None:
                timed["old_w8"] = ([lambda q=q, s=s, x=x: old.w8_mm(x, q, s) for q, s in q8], 1.0)
                for group in GROUPS:
                    timed[f"old_w4_g{group}"] = (
                        [lambda p=p, sz=sz, g=group, x=x: old.w4_mm(x, p, sz, g) for p, sz in q4[group]],
                        0.5 + 4 / group,
                    )
            cfg_of = {config_key("w8", 0, c): (0, c) for c in w8_sweep(m)}
            for group in GROUPS:
                for cfg in w4_sweep(m, group):
                    cfg_of[config_key("w4", group, cfg)] = (group, cfg)
            cfg_of = {key: v for key, v in cfg_of.items() if key not in BAD}
            for key, (group, cfg) in cfg_of.items():
                timed[key] = (launches(q8, q4, x, group, cfg), 1.0 if group == 0 else 0.5 + 4 / group)
            for kname, (fns, _) in timed.items():
                row[kname] = timed_us(fns)
            # K splits on the best config of each kernel where the tiles are few
            for prefix in ("w8", *(f"w4g{g}" for g in GROUPS)):
                keys = [kk for kk in cfg_of if kk.startswith(prefix + " ") and isinstance(row[kk], float)]
                if not keys:
                    continue
                group, cfg = cfg_of[min(keys, key=lambda kk: row[kk])]
                if math.ceil(m / cfg.bm) * math.ceil(n / cfg.bn) >= 66:
                    continue
                for split in SPLITS:
                    c = cfg._replace(split=split)
                    row[f"{prefix} {tuple(c)}"] = timed_us(launches(q8, q4, x, group, c))
            log(json.dumps(row))
            rows.append(row)
        del ws, q8, q4
        torch.cuda.empty_cache()


def best(row: dict[str, Any], prefix: str) -> tuple[str, float]:
    keys = [k for k in row if k.startswith(prefix + " ") and isinstance(row[k], float)]
    if not keys:
        return "", float("nan")
    k = min(keys, key=lambda kk: row[kk])
    return k[len(prefix) + 1 :], row[k]


def parse_cfg(text: str) -> TileConfig:
    return TileConfig(*ast.literal_eval(text))


def install_best(results: dict[str, Any]) -> None:
    """The fastest config per (kernel, M bucket, shape class) (summed over the class's linears) into
    quant_kernels' tables; logs them as Python."""
    rows = results.get("sweep", [])
    chosen: dict[str, Any] = {}
    for prefix in ("w8", *(f"w4g{g}" for g in GROUPS)):
        for m in ROWS:
            by_class: dict[str, dict[str, float]] = {}
            for row in rows:
                if row["M"] != m:
                    continue
                cls = qk.shape_class(row["N"], row["K"])
                for k, v in row.items():
                    if k.startswith(prefix + " ") and isinstance(v, float):
                        cfg_text = k[len(prefix) + 1 :]
                        d = by_class.setdefault(cls, {})
                        d[cfg_text] = d.get(cfg_text, 0.0) + v
            for cls, totals in by_class.items():
                # a config must have run on every linear of the class: keep those timed for all
                n_lin = sum(1 for r in rows if r["M"] == m and qk.shape_class(r["N"], r["K"]) == cls)
                counts = {
                    c: sum(
                        1
                        for r in rows
                        if r["M"] == m
                        and qk.shape_class(r["N"], r["K"]) == cls
                        and isinstance(r.get(f"{prefix} {c}"), float)
                    )
                    for c in totals
                }
                full = {c: t for c, t in totals.items() if counts[c] == n_lin}
                if not full:
                    continue
                cfg = parse_cfg(min(full, key=full.__getitem__))
                chosen[f"{prefix} {m} {cls}"] = list(cfg)
                if prefix == "w8":
                    qk.W8_CONFIGS[(m, cls)] = cfg
                else:
                    group = int(prefix[3:])
                    qk.W4_CONFIGS[(group, m, cls)] = cfg
    results["chosen"] = chosen
    log(
        "W8_CONFIGS = {"
        + ", ".join(
            f"({k.split()[1]}, {k.split()[2]!r}): TileConfig{tuple(v)}"
            for k, v in chosen.items()
            if k.startswith("w8 ")
        )
        + "}"
    )
    log(
        "W4_CONFIGS = {"
        + ", ".join(
            f"({k.split()[0][3:]}, {k.split()[1]}, {k.split()[2]!r}): TileConfig{tuple(v)}"
            for k, v in chosen.items()
            if k.startswith("w4")
        )
        + "}"
    )


def summary(results: dict[str, Any]) -> None:
    log(
        "\n| linear | rows | bf16 | old w8 | w8 best | old w4 g32 | w4 g32 best | old w4 g128 | w4 g128 best "
        "| best configs (w8 / g32 / g128) |"
    )
    log("|---|---|---|---|---|---|---|---|---|---|")
    for row in results.get("sweep", []):
        b8, t8 = best(row, "w8")
        b32, t32 = best(row, "w4g32")
        b128, t128 = best(row, "w4g128")
        log(
            f"| {row['linear']} | {row['M']} | {row['bf16']} | {row.get('old_w8', '-')} | {t8} | "
            f"{row.get('old_w4_g32', '-')} | {t32} | {row.get('old_w4_g128', '-')} | {t128} | {b8} / {b32} / {b128} |"
        )


# --- 3. decode ------------------------------------------------------------------------------------
def decode(results: dict[str, Any], variants: list[str], deadline: float) -> None:
    import gpu
    import gpu_quant

    gpu.PROMPT_LEN, gpu.NEW_TOKENS = 128, 128
    gpu.LOG_FILE = LOG_FILE
    bw = gpu.copy_bandwidth()
    results["copy_bandwidth_GBps"] = bw / 1e9
    hf = gpu.hf_model(gpu_quant.SHAPE, torch.bfloat16, seed=0)
    for vname in variants:
        if time.perf_counter() > deadline:
            log(f"decode: out of time before {vname}")
            break
        try:
            gpu_quant.bench_variant(vname, hf, bw, results)
        except Exception as exc:
            log(f"{vname} failed: {exc!r}"[:3000])
    base = next((v for v in results.get("variants", []) if v["variant"] == "bf16"), None)
    for v in results.get("variants", []):
        x64 = v["decode_tok_s_64"] / base["decode_tok_s_64"] if base else float("nan")
        log(
            f"| {v['variant']} | {v['weight_GB']:.2f} GB | replay ms 1 / 64 {v['replay_ms_1']:.3f} / "
            f"{v['replay_ms_64']:.3f} | tok/s 1 {v['decode_tok_s_1']:.0f} | tok/s 64 {v['decode_tok_s_64']:.0f} "
            f"| x bf16 at 64 {x64:.2f} |"
        )


def main() -> None:
    global LOG_FILE
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--variants", default="int4-triton-g32,int8,bf16")
    ap.add_argument("--workers", type=int, default=15)
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop starting new parts after this")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    LOG_FILE = out / "log.txt"
    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    log(json.dumps(results))
    path = out / "gemm.json"
    try:
        run_checks(results, a.workers)
        path.write_text(json.dumps(results, indent=2))
        sweep(results, T0 + 0.45 * a.budget_s)
        path.write_text(json.dumps(results, indent=2))
        summary(results)
        install_best(results)
        path.write_text(json.dumps(results, indent=2))
        decode(results, [v for v in a.variants.split(",") if v], T0 + a.budget_s - 75)
    finally:
        path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
