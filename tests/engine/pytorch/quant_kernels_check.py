"""Checks of the Triton weight-only int8 / int4 matmuls, run as a script by test_quant_kernels.py.

A separate process because Triton's CPU interpreter (TRITON_INTERPRET=1, for machines without a
GPU) must be switched on before `triton` is first imported, and torch may import it early.
Usage: python quant_kernels_check.py [checkpoint dir of a tiny model]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from deepseek_serve.engine.runners.pytorch import quant_kernels
from deepseek_serve.engine.runners.pytorch.compile import DecodeStep
from deepseek_serve.engine.runners.pytorch.forward_batch import ForwardBatch, additive_mask
from deepseek_serve.engine.runners.pytorch.loading import load_model
from deepseek_serve.engine.runners.pytorch.modules import KVCache
from deepseek_serve.engine.runners.pytorch.quantize import (
    Int4Linear,
    dequantize_int4,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantize_model,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Triton's CPU interpreter computes bf16 dots wrongly (bit patterns, not values): bf16 is checked
# on a GPU only (run this script there too); on a GPU float32 dots are TF32
CUDA = DEVICE.type == "cuda"
DTYPES = [(torch.float32, 5e-3 if CUDA else 1e-3)] + ([(torch.bfloat16, 1e-2)] if CUDA else [])
# (M, N, K) through the default configs: tiles partly past M and N, K not a multiple of the K tile,
# K split over programs
SHAPES = [(1, 96, 1024), (3, 70, 256), (4, 33, 640), (17, 64, 512), (40, 130, 256), (70, 40, 2048)]
# explicit tile paths: (config, M, N, K); both orientations, every row tile, K tiles of 64..256 (int4:
# one and several groups per tile), split K (auto and forced, an odd count), tails of M, N and K, the
# bit-trick dequantization (CUDA bf16; elsewhere the conversions)
TILE_CASES = [
    (quant_kernels.TileConfig(16, 64, 128, 4, 3, swap=True, split=1), 2, 64, 256),
    (quant_kernels.TileConfig(16, 64, 128, 4, 3, swap=True, split=3), 5, 70, 640),
    (quant_kernels.TileConfig(16, 128, 256, 4, 3, swap=True), 16, 130, 768),
    (quant_kernels.TileConfig(32, 64, 64, 4, 3, swap=True, split=2), 19, 64, 320),
    (quant_kernels.TileConfig(64, 64, 128, 8, 4, swap=True), 33, 96, 384),
    (quant_kernels.TileConfig(128, 64, 128, 4, 3, swap=True, split=1), 100, 40, 256),
    (quant_kernels.TileConfig(16, 64, 128, 4, 3, swap=False, split=2), 7, 64, 512),
    (quant_kernels.TileConfig(64, 32, 256, 4, 3, swap=False), 64, 50, 1280),
    (quant_kernels.TileConfig(32, 128, 128, 4, 4, fast=True), 24, 136, 640),  # bit tricks: CUDA bf16 only
]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def check_w8() -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for dtype, tol in DTYPES:
        for m, n, k in SHAPES:
            w = torch.randn(n, k, device=DEVICE, generator=gen)
            q, scales = quantize_int8(w)
            x = torch.randn(m + 2, k, device=DEVICE, generator=gen).to(dtype)[1 : m + 1]  # a row-strided view
            ref = x.float() @ (q.float() * scales[:, None]).t()
            out = quant_kernels.w8_mm(x, q, scales.to(dtype))
            assert out.shape == (m, n) and out.dtype == dtype, (out.shape, out.dtype)
            err = rel_err(out, ref)
            assert err < tol, ("w8", dtype, m, n, k, err)
    print("w8_mm ok")


def check_w4() -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    for group in (32, 128):
        for dtype, tol in DTYPES:
            for m, n, k in SHAPES:
                if k % group:
                    continue
                w = torch.randn(n, k, device=DEVICE, generator=gen)
                codes, sz = quantize_int4(w, group)
                ref = torch.randn(m, k, device=DEVICE, generator=gen).to(dtype)
                expect = ref.float() @ dequantize_int4(codes, sz.to(dtype).float(), group).t()
                out = quant_kernels.w4_mm(ref, pack_int4(codes, group), sz.to(dtype), group)
                assert out.shape == (m, n) and out.dtype == dtype, (out.shape, out.dtype)
                err = rel_err(out, expect)
                assert err < tol, ("w4", group, dtype, m, n, k, err)
    print("w4_mm ok")


def check_tiles() -> None:
    """Every explicit tile path of `w8_launch` / `w4_launch` against reference math (float32 here;
    on a GPU bf16 too); int4 also with bf16 scale/zero pairs under float32 activations."""
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    counters = quant_kernels._counters(DEVICE)
    for dtype, tol in DTYPES:
        for cfg, m, n, k in TILE_CASES:
            w = torch.randn(n, k, device=DEVICE, generator=gen)
            x = torch.randn(m, k, device=DEVICE, generator=gen).to(dtype)
            q, scales = quantize_int8(w)
            ref = x.float() @ (q.float() * scales[:, None]).t()
            out = quant_kernels.w8_launch(x, q, scales.to(dtype), cfg)
            assert out.shape == (m, n) and out.dtype == dtype, (out.shape, out.dtype)
            err = rel_err(out, ref)
            assert err < tol, ("w8 tile", cfg, dtype, m, n, k, err)
            for group in (32, 64, 128):
                if k % group or cfg.bk % group:
                    continue
                codes, sz = quantize_int4(w, group)
                for sz_dtype in {dtype, torch.bfloat16}:
                    expect = x.float() @ dequantize_int4(codes, sz.to(sz_dtype).float(), group).t()
                    out = quant_kernels.w4_launch(x, pack_int4(codes, group), sz.to(sz_dtype), group, cfg)
                    err = rel_err(out, expect)
                    assert err < tol, ("w4 tile", cfg, group, dtype, sz_dtype, m, n, k, err)
            assert int(counters.abs().sum()) == 0, "split-K counters not reset"
    print("tile paths ok")


def check_configs() -> None:
    """The config tables: every bucket and shape class resolves, int4 K tiles are multiples of the group."""
    for m in (2, 16, 17, 64, 65, 128):
        for n, k in ((2048, 1536), (1536, 8960), (17920, 1536), (151936, 1536)):
            cfg = quant_kernels.w8_config(m, n, k, torch.bfloat16)
            assert cfg.bm >= min(m, 16) and cfg.bk >= 16, cfg
            for group in (32, 64, 128):
                cfg4 = quant_kernels.w4_config(m, n, k, group, torch.bfloat16)
                assert cfg4.bk % group == 0, (cfg4, group)
    print("configs ok")


def check_decode_step(path: Path) -> None:
    """A tiny Qwen2 with int4 (Triton kernel) layers and an int8 head: the compiled decode step
    (aot_eager on CPU) and the eager forward give the same logits, and they match the same weights
    run through aten's CPU int4 kernel."""
    model = load_model(path, torch.float32, DEVICE)
    ref = load_model(path, torch.float32, DEVICE)
    quantize_model(model, "int4", group_size=32, int4_kernel="triton")
    quantize_model(ref, "int4", group_size=32, int4_kernel="cpu" if DEVICE.type == "cpu" else "tinygemm")
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, Int4Linear) and layer.kernel == "triton"
    b, s = 3, 16
    model.setup_rope(s + 1, DEVICE)
    ref.setup_rope(s + 1, DEVICE)
    outs = []
    for m, step in ((model, None), (model, DecodeStep(model, attention="sdpa", backend="aot_eager")), (ref, None)):
        cache = KVCache(m.args, b, s, torch.float32, DEVICE)
        cache.kv.normal_(0, 1, generator=torch.Generator(device=DEVICE).manual_seed(2))
        pos = torch.tensor([[3], [9], [0]], device=DEVICE)
        mask = additive_mask((torch.arange(s, device=DEVICE)[None, :] <= pos).view(b, 1, 1, s), torch.float32)
        fb = ForwardBatch(slots=None, positions=pos, write_pos=pos, mask=mask)
        tok = torch.tensor([[5], [17], [200]], device=DEVICE)
        with torch.inference_mode():
            outs.append(step(tok, cache, fb)[0] if step is not None else m(tok, cache, fb)[:, 0])
    assert rel_err(outs[1], outs[0]) < 1e-4, rel_err(outs[1], outs[0])
    assert rel_err(outs[0], outs[2]) < 1e-2, rel_err(outs[0], outs[2])
    print("quantized decode step ok")


if __name__ == "__main__":
    check_configs()
    check_w8()
    check_w4()
    check_tiles()
    if len(sys.argv) > 1:
        check_decode_step(Path(sys.argv[1]))
    print("quant kernel checks passed")
