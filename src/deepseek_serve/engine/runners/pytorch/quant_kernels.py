"""Weight-only int8 / int4 matmuls in Triton for 2..128 rows: y[M, N] = x[M, K] @ dequant(w)[N, K]^T,
the weights read once and dequantized in registers.

- `w8_mm`: int8 weights [N, K] with one scale per output channel: acc += w_tile.to(x.dtype) @ x_tile^T
  over K tiles of BK (one tensor-core dot each), times the scales at the end.
- `w4_mm`: int4 codes packed two per byte, [N, K / 2] uint8 (`quantize.pack_int4`), in groups of G
  along K: byte j of group g holds code (g, j) in its low nibble and code (g, j + G/2) in its high
  nibble. A K tile of BK (a multiple of G) is BK/2 bytes per output channel; its low nibbles are the
  first halves of its groups, its high nibbles the second halves, so a tile is two dots of K extent
  BK/2 against x gathered at those columns. Scales and zeros are [K / G, N, 2] (value =
  (code - 8) * scale + zero): each tile is dequantized in registers with its groups' scale and zero
  before the dots.

Few rows make the weight tile the big operand: with `TileConfig.swap` the kernel computes y^T = w @ x^T,
so the dequantized weight tile is the tensor-core A operand (in registers on Hopper, BN output channels
as the MMA's M) and the rows are the MMA's N (16..128). Rows come in tiles of BM (the M bucket).

When the output tiles are fewer than the SMs, K is split over SPLIT programs per tile: each writes a
float32 partial, and the last of a tile to finish (a per-tile arrival counter) sums the partials in
split order and writes the output, so one launch does it all and the sum is deterministic. The
counters live in one int32 buffer per device that each tile resets to zero when done: launches on
one device must not run concurrently on two streams.

Tile configs per M bucket and shape class are fixed tables (`W8_CONFIGS`, `W4_CONFIGS`): no autotuning
at run time, since the shapes are captured in CUDA graphs at warm-up. Both ops are custom ops
(`deepseek_serve::w8_mm`, `deepseek_serve::w4_mm`): torch.compile keeps each as one opaque call and
CUDA graphs capture its launch. CUDA, or Triton's CPU interpreter in tests.
"""

# Triton kernel parameters are untyped pointers and scalars (Triton specializes on them).
# Integer -> bf16 casts go through float32: exact, what the compiler emits anyway, and Triton's CPU
# interpreter reinterprets the bits of a direct int -> bf16 cast.
# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor


class TileConfig(NamedTuple):
    """One launch shape. bm: rows per program (16..128); bn: output channels per program; bk: K per
    iteration (int4: a multiple of the group); warps / stages: Triton's num_warps / num_stages; swap:
    compute y^T (weights as the MMA's A operand); split: K splits per tile (0 = `_splits`); fast:
    dequantize with PTX bit tricks instead of int -> float conversions (CUDA and bf16 only: the
    conversion units give 16 results per clock per SM, too few for a memory-bound kernel)."""

    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    swap: bool = True
    split: int = 0
    fast: bool = False


ShapeClass = str  # "small" | "deep" | "wide" | "huge", see `shape_class`
BUCKETS = (16, 32, 64, 128)  # M buckets: rows 2..16 use the 16 entry, 17..32 the 32 entry, ...
MAX_COUNTERS = 4096  # tiles of one split launch (split only runs when tiles < the SM count)
MIN_K_STEPS = 2  # K iterations per split at least

# The fastest config per (M bucket, shape class) of the sweep in bench/gpu_gemm.py on an H200 (2026-11-30
# 17:22 UTC, bench/results/gpu-h200-gemm.json: 1.5B-shape linears at 16/32/64/128 rows, each config timed
# in CUDA-graph replays over weight copies that defeat the L2; a class's time summed over its linears).
# Groups of 64 were not swept: they take the groups-of-32 configs (K tiles are multiples of 64).
W8_CONFIGS: dict[tuple[int, ShapeClass], TileConfig] = {
    (16, "small"): TileConfig(16, 64, 128, 4, 4, fast=True),
    (16, "wide"): TileConfig(16, 128, 128, 4, 4, swap=False),
    (16, "deep"): TileConfig(16, 128, 128, 8, 4, fast=True),
    (16, "huge"): TileConfig(16, 128, 128, 4, 4, swap=False),
    (32, "small"): TileConfig(32, 64, 256, 4, 4, fast=True),
    (32, "wide"): TileConfig(32, 64, 128, 4, 4, fast=True),
    (32, "deep"): TileConfig(32, 128, 128, 4, 4, swap=False, fast=True),
    (32, "huge"): TileConfig(32, 128, 128, 4, 4, swap=False, fast=True),
    (64, "small"): TileConfig(64, 64, 256, 4, 4, fast=True),
    (64, "wide"): TileConfig(64, 64, 128, 4, 4, fast=True),
    (64, "deep"): TileConfig(64, 128, 128, 8, 4, fast=True),
    (64, "huge"): TileConfig(64, 128, 128, 4, 4),
    (128, "small"): TileConfig(128, 64, 128, 4, 4, split=3, fast=True),
    (128, "wide"): TileConfig(128, 64, 128, 4, 4, fast=True),
    (128, "deep"): TileConfig(128, 64, 128, 4, 4, split=4, fast=True),
    (128, "huge"): TileConfig(128, 128, 128, 8, 4, fast=True),
}
W4_CONFIGS: dict[tuple[int, int, ShapeClass], TileConfig] = {
    (32, 16, "small"): TileConfig(16, 64, 128, 4, 4, fast=True),
    (32, 16, "wide"): TileConfig(16, 128, 128, 4, 4, swap=False, fast=True),
    (32, 16, "deep"): TileConfig(16, 128, 128, 8, 4, fast=True),
    (32, 16, "huge"): TileConfig(16, 128, 128, 4, 4, swap=False, fast=True),
    (32, 32, "small"): TileConfig(32, 64, 128, 4, 4, fast=True),
    (32, 32, "wide"): TileConfig(32, 128, 64, 4, 4, fast=True),
    (32, 32, "deep"): TileConfig(32, 128, 128, 8, 4, fast=True),
    (32, 32, "huge"): TileConfig(32, 128, 256, 4, 3, fast=True),
    (32, 64, "small"): TileConfig(64, 64, 128, 4, 4, fast=True),
    (32, 64, "wide"): TileConfig(64, 128, 64, 4, 4, fast=True),
    (32, 64, "deep"): TileConfig(64, 128, 128, 4, 4, fast=True),
    (32, 64, "huge"): TileConfig(64, 128, 64, 4, 4, fast=True),
    (32, 128, "small"): TileConfig(64, 128, 128, 4, 4, fast=True),
    (32, 128, "wide"): TileConfig(64, 128, 128, 4, 4, fast=True),
    (32, 128, "deep"): TileConfig(128, 128, 128, 8, 4, fast=True),
    (32, 128, "huge"): TileConfig(128, 128, 64, 4, 4, fast=True),
    (128, 16, "small"): TileConfig(16, 64, 128, 4, 4, fast=True),
    (128, 16, "wide"): TileConfig(16, 128, 128, 4, 4, swap=False, fast=True),
    (128, 16, "deep"): TileConfig(16, 128, 128, 8, 4, fast=True),
    (128, 16, "huge"): TileConfig(16, 128, 128, 4, 4, swap=False, fast=True),
    (128, 32, "small"): TileConfig(32, 64, 128, 4, 4, split=3, fast=True),
    (128, 32, "wide"): TileConfig(32, 64, 128, 4, 4, fast=True),
    (128, 32, "deep"): TileConfig(32, 128, 128, 8, 4, fast=True),
    (128, 32, "huge"): TileConfig(32, 128, 256, 4, 3, fast=True),
    (128, 64, "small"): TileConfig(64, 64, 128, 4, 4, split=3, fast=True),
    (128, 64, "wide"): TileConfig(64, 64, 128, 4, 4, fast=True),
    (128, 64, "deep"): TileConfig(64, 128, 128, 8, 4, fast=True),
    (128, 64, "huge"): TileConfig(64, 128, 128, 4, 4, fast=True),
    (128, 128, "small"): TileConfig(64, 128, 128, 4, 4, split=3, fast=True),
    (128, 128, "wide"): TileConfig(64, 128, 128, 4, 4, fast=True),
    (128, 128, "deep"): TileConfig(128, 128, 128, 8, 4, fast=True),
    (128, 128, "huge"): TileConfig(128, 128, 128, 8, 4, fast=True),
}
# groups of 64: the groups-of-32 configs (see above)
W4_CONFIGS.update({(64, m, c): cfg for (g, m, c), cfg in list(W4_CONFIGS.items()) if g == 32})
# float32 activations (float32 models; the interpreter in tests): TF32 dots over one generic tile
FP32_CONFIG = TileConfig(16, 64, 128, 4, 2)


def shape_class(n: int, k: int) -> ShapeClass:
    """small: few weights (latency-bound, qkv / o of a 1.5B model); deep: K >= 4 N (down); huge:
    >= 64M weights (an LM head); wide: the rest (gate_up)."""
    if n * k < (8 << 20):
        return "small"
    if n * k >= (64 << 20):
        return "huge"
    return "deep" if k >= 4 * n else "wide"


def bucket(m: int) -> int:
    """The M bucket of `m` rows (>= 1; above 128 rows the 128 entry)."""
    return next((b for b in BUCKETS if m <= b), BUCKETS[-1])


@triton.jit
def _int8_to_bf16(w):
    """int8 -> bf16, exact, 4 at a time: each byte (+128) goes into the mantissa of 2^23 (float32),
    2^23 + 128 is subtracted, and the float32's upper half is the bf16 (its lower half is zero)."""
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 u, t0, t1, t2, t3;
        xor.b32 u, $2, 0x80808080;
        prmt.b32 t0, u, 0x4B000000, 0x7440;
        prmt.b32 t1, u, 0x4B000000, 0x7441;
        prmt.b32 t2, u, 0x4B000000, 0x7442;
        prmt.b32 t3, u, 0x4B000000, 0x7443;
        sub.f32 t0, t0, 0f4B000080;
        sub.f32 t1, t1, 0f4B000080;
        sub.f32 t2, t2, 0f4B000080;
        sub.f32 t3, t3, 0f4B000080;
        prmt.b32 $0, t0, t1, 0x7632;
        prmt.b32 $1, t2, t3, 0x7632;
        }
        """,
        constraints="=r,=r,r",
        args=[w],
        dtype=tl.bfloat16,
        is_pure=True,
        pack=4,
    )


@triton.jit
def _int4_to_bf16(b, scale, zero):
    """Packed bytes -> (low nibbles, high nibbles) dequantized to bf16, 4 bytes at a time: each
    nibble ORed into the mantissa of bf16 128 (exact), 136 subtracted (exact: code - 8), then one
    bf16 FMA with the element's scale and zero (one rounding, like float32 math and a bf16 cast)."""
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 t0, t1, l0, l1, h0, h1, k;
        prmt.b32 t0, $4, 0, 0x4140;
        prmt.b32 t1, $4, 0, 0x4342;
        lop3.b32 l0, t0, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 l1, t1, 0x000F000F, 0x43004300, 0xEA;
        shr.b32 t0, t0, 4;
        shr.b32 t1, t1, 4;
        lop3.b32 h0, t0, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 h1, t1, 0x000F000F, 0x43004300, 0xEA;
        mov.b32 k, 0x43084308;
        sub.rn.bf16x2 l0, l0, k;
        sub.rn.bf16x2 l1, l1, k;
        sub.rn.bf16x2 h0, h0, k;
        sub.rn.bf16x2 h1, h1, k;
        fma.rn.bf16x2 $0, l0, $5, $7;
        fma.rn.bf16x2 $1, l1, $6, $8;
        fma.rn.bf16x2 $2, h0, $5, $7;
        fma.rn.bf16x2 $3, h1, $6, $8;
        }
        """,
        constraints="=r,=r,=r,=r,r,r,r,r,r",
        args=[b, scale, zero],
        dtype=(tl.bfloat16, tl.bfloat16),
        is_pure=True,
        pack=4,
    )


@triton.jit
def _split_k_store(
    acc, y_ptr, part_ptr, count_ptr, rm, rn, M, N, stride_ym, pid_k, tile, SPLIT, BM: tl.constexpr, BN: tl.constexpr
):
    """acc [BM, BN] float32 -> y (SPLIT == 1), or a partial and, for the tile's last split, their sum."""
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    if SPLIT == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        p_off = rm[:, None] * N + rn[None, :]
        tl.store(part_ptr + pid_k * M * N + p_off, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the arrival is published
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            total = tl.zeros((BM, BN), dtype=tl.float32)
            for s in range(0, SPLIT):
                total += tl.load(part_ptr + s * M * N + p_off, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(count_ptr + tile, 0)


@triton.jit(do_not_specialize=["SPLIT"])
def _w8_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    y_ptr,
    part_ptr,
    count_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    K_PER_SPLIT,
    SPLIT,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SWAP: tl.constexpr,
    FAST: tl.constexpr,
):
    pid_m = tl.program_id(0)  # fastest: the row tiles of one weight tile run side by side (L2)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    k_start = pid_k * K_PER_SPLIT
    x_ptrs = x_ptr + rm[:, None] * stride_xm + (k_start + rk)[None, :]  # [BM, BK]
    w_ptrs = w_ptr + rn[:, None] * stride_wn + (k_start + rk)[None, :]  # [BN, BK]
    if SWAP:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kk in range(0, K_PER_SPLIT, BK):
        k_ok = rk < K - k_start - kk
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0)
        if FAST:  # noqa: SIM108
            wf = _int8_to_bf16(w)
        else:
            wf = w.to(tl.float32).to(x.dtype)
        if SWAP:  # noqa: SIM108
            acc = tl.dot(wf, tl.trans(x), acc)  # [BN, BM]
        else:
            acc = tl.dot(x, tl.trans(wf), acc)  # [BM, BN]
        x_ptrs += BK
        w_ptrs += BK
    if SWAP:
        acc = tl.trans(acc)
    s = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    acc = acc * s[None, :]
    tile = pid_n * tl.num_programs(0) + pid_m
    _split_k_store(acc, y_ptr, part_ptr, count_ptr, rm, rn, M, N, stride_ym, pid_k, tile, SPLIT, BM, BN)


@triton.jit(do_not_specialize=["SPLIT"])
def _w4_kernel(
    x_ptr,
    w_ptr,
    sz_ptr,
    y_ptr,
    part_ptr,
    count_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    K_PER_SPLIT,
    SPLIT,
    GROUP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SWAP: tl.constexpr,
    SZ_PAIRS: tl.constexpr,
    FAST: tl.constexpr,
):
    HALF: tl.constexpr = GROUP // 2
    BKH: tl.constexpr = BK // 2  # packed bytes per output channel per iteration
    NG: tl.constexpr = BK // GROUP  # groups per iteration
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rc = tl.arange(0, BKH)  # byte column of the tile
    rg = tl.arange(0, NG)
    # K offset of byte column c's low nibble: group c // HALF, first half; the high nibble is HALF later
    k_lo = (rc // HALF) * GROUP + rc % HALF
    k_lo = tl.max_contiguous(tl.multiple_of(k_lo, HALF), HALF)
    m_ok = rm < M
    n_ok = rn < N
    k_start = pid_k * K_PER_SPLIT
    if SWAP:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kk in range(0, K_PER_SPLIT, BK):
        k0 = k_start + kk
        c_ok = k_lo < K - k0  # whole groups are in or out (K % GROUP == 0)
        g_ok = rg < (K - k0) // GROUP
        x_ptrs = x_ptr + rm[:, None] * stride_xm + (k0 + k_lo)[None, :]  # [BM, BKH]
        x_lo = tl.load(x_ptrs, mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        x_hi = tl.load(x_ptrs + HALF, mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(
            w_ptr + rn[:, None] * stride_wn + (k0 // 2 + rc)[None, :], mask=n_ok[:, None] & c_ok[None, :], other=0
        )
        g_off = (k0 // GROUP + rg)[None, :] * N + rn[:, None]  # [BN, NG] (group, channel) index
        if SZ_PAIRS:  # bf16 (scale, zero) pairs read as one int32: scale the low half, zero the high
            sz = tl.load(sz_ptr + g_off, mask=n_ok[:, None] & g_ok[None, :], other=0)
            scale = (sz << 16).to(tl.float32, bitcast=True)
            zero = ((sz >> 16) << 16).to(tl.float32, bitcast=True)
        else:
            scale = tl.load(sz_ptr + g_off * 2, mask=n_ok[:, None] & g_ok[None, :], other=0.0).to(tl.float32)
            zero = tl.load(sz_ptr + g_off * 2 + 1, mask=n_ok[:, None] & g_ok[None, :], other=0.0).to(tl.float32)
        # [BN, NG, 1]: per group, broadcast over its HALF byte columns
        if FAST:
            scale2 = tl.reshape(tl.broadcast_to(scale.to(tl.bfloat16)[:, :, None], (BN, NG, HALF)), (BN, BKH))
            zero2 = tl.reshape(tl.broadcast_to(zero.to(tl.bfloat16)[:, :, None], (BN, NG, HALF)), (BN, BKH))
            lo, hi = _int4_to_bf16(b, scale2, zero2)
        else:
            scale3 = scale[:, :, None]
            zero3 = zero[:, :, None] - 8.0 * scale3
            lo = tl.reshape((b & 0xF).to(tl.float32), (BN, NG, HALF)) * scale3 + zero3
            hi = tl.reshape((b >> 4).to(tl.float32), (BN, NG, HALF)) * scale3 + zero3
            lo = tl.reshape(lo, (BN, BKH)).to(x_lo.dtype)
            hi = tl.reshape(hi, (BN, BKH)).to(x_lo.dtype)
        if SWAP:
            acc = tl.dot(lo, tl.trans(x_lo), acc)  # [BN, BM]
            acc = tl.dot(hi, tl.trans(x_hi), acc)
        else:
            acc = tl.dot(x_lo, tl.trans(lo), acc)  # [BM, BN]
            acc = tl.dot(x_hi, tl.trans(hi), acc)
    if SWAP:
        acc = tl.trans(acc)
    tile = pid_n * tl.num_programs(0) + pid_m
    _split_k_store(acc, y_ptr, part_ptr, count_ptr, rm, rn, M, N, stride_ym, pid_k, tile, SPLIT, BM, BN)


_COUNTERS: dict[torch.device, Tensor] = {}


def _counters(device: torch.device) -> Tensor:
    """The per-device arrival counters of split launches (zero between launches)."""
    if device not in _COUNTERS:
        _COUNTERS[device] = torch.zeros(MAX_COUNTERS, dtype=torch.int32, device=device)
    return _COUNTERS[device]


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H100 / H200


def _splits(tiles: int, k_steps: int, sms: int) -> int:
    """K splits that bring the programs near one per SM, each split keeping MIN_K_STEPS K steps."""
    if tiles >= sms // 2:
        return 1
    return max(1, min(triton.cdiv(sms, tiles), k_steps // MIN_K_STEPS))


def _launch_shape(m: int, n: int, k: int, cfg: TileConfig, device: torch.device) -> tuple[tuple[int, int, int], int]:
    """The grid (row tiles, column tiles, splits) and K per split (a multiple of cfg.bk)."""
    tiles_m, tiles_n = triton.cdiv(m, cfg.bm), triton.cdiv(n, cfg.bn)
    k_steps = triton.cdiv(k, cfg.bk)
    split = cfg.split or _splits(tiles_m * tiles_n, k_steps, _num_sms(device))
    split = max(1, min(split, k_steps))
    k_per = triton.cdiv(k_steps, split) * cfg.bk
    split = triton.cdiv(k, k_per)
    if split > 1 and tiles_m * tiles_n > MAX_COUNTERS:
        k_per, split = k_steps * cfg.bk, 1
    return (tiles_m, tiles_n, split), k_per


def w8_launch(x: Tensor, w: Tensor, scales: Tensor, cfg: TileConfig) -> Tensor:
    """`w8_mm` with an explicit tile config (benchmarks and tests)."""
    m, k = x.shape
    n = w.shape[0]
    grid, k_per = _launch_shape(m, n, k, cfg, x.device)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    split = grid[2]
    part = torch.empty((split, m, n) if split > 1 else (1,), dtype=torch.float32, device=x.device)
    counters = _counters(x.device)
    _w8_kernel[grid](
        x,
        w,
        scales,
        y,
        part,
        counters,
        m,
        n,
        k,
        x.stride(0),
        w.stride(0),
        y.stride(0),
        k_per,
        split,
        BM=cfg.bm,
        BN=cfg.bn,
        BK=cfg.bk,
        SWAP=cfg.swap,
        FAST=cfg.fast and x.is_cuda and x.dtype == torch.bfloat16,
        num_warps=cfg.warps,
        num_stages=cfg.stages,
    )
    return y


def w4_launch(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, group_size: int, cfg: TileConfig) -> Tensor:
    """`w4_mm` with an explicit tile config (benchmarks and tests); cfg.bk a multiple of the group."""
    m, k = x.shape
    n = packed.shape[0]
    if cfg.bk % group_size:
        raise ValueError(f"w4: BK {cfg.bk} is not a multiple of the group {group_size}")
    grid, k_per = _launch_shape(m, n, k, cfg, x.device)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    split = grid[2]
    part = torch.empty((split, m, n) if split > 1 else (1,), dtype=torch.float32, device=x.device)
    counters = _counters(x.device)
    sz = scales_and_zeros.contiguous()
    pairs = sz.dtype == torch.bfloat16  # bf16 -> float32 is a 16-bit shift
    if pairs:
        sz = sz.view(torch.int32)  # [K / G, N, 1]: (scale, zero) in one word
    _w4_kernel[grid](
        x,
        packed,
        sz,
        y,
        part,
        counters,
        m,
        n,
        k,
        x.stride(0),
        packed.stride(0),
        y.stride(0),
        k_per,
        split,
        GROUP=group_size,
        BM=cfg.bm,
        BN=cfg.bn,
        BK=cfg.bk,
        SWAP=cfg.swap,
        SZ_PAIRS=pairs,
        FAST=cfg.fast and x.is_cuda and x.dtype == torch.bfloat16,
        num_warps=cfg.warps,
        num_stages=cfg.stages,
    )
    return y


def w8_config(m: int, n: int, k: int, dtype: torch.dtype) -> TileConfig:
    """The tile config of `w8_mm` for this shape (the tables; float32 the generic tile)."""
    if dtype == torch.float32:
        return FP32_CONFIG
    return W8_CONFIGS[(bucket(m), shape_class(n, k))]


def w4_config(m: int, n: int, k: int, group_size: int, dtype: torch.dtype) -> TileConfig:
    """The tile config of `w4_mm` for this shape and group."""
    if dtype == torch.float32:
        cfg = FP32_CONFIG
    else:
        cfg = W4_CONFIGS.get((group_size, bucket(m), shape_class(n, k)), FP32_CONFIG)
    return cfg._replace(bk=max(cfg.bk // group_size, 1) * group_size)


@torch.library.custom_op("deepseek_serve::w8_mm", mutates_args=())
def w8_mm(x: Tensor, w: Tensor, scales: Tensor) -> Tensor:
    """x [M, K] float, w [N, K] int8, scales [N] -> [M, N] in x's dtype."""
    m, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k or x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"w8_mm: x {tuple(x.shape)} / w {tuple(w.shape)}")
    if m == 0:
        return x.new_empty((0, n))
    return w8_launch(x, w, scales, w8_config(m, n, k, x.dtype))


@w8_mm.register_fake
def _(x: Tensor, w: Tensor, scales: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], w.shape[0]))


@torch.library.custom_op("deepseek_serve::w4_mm", mutates_args=())
def w4_mm(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    """x [M, K] bf16/fp16/fp32, packed [N, K / 2] uint8 (`pack_int4`), scales_and_zeros [K / G, N, 2]
    -> [M, N] in x's dtype."""
    m, k = x.shape
    n = packed.shape[0]
    if packed.shape[1] * 2 != k or k % group_size or x.stride(1) != 1 or packed.stride(1) != 1:
        raise ValueError(f"w4_mm: x {tuple(x.shape)} / packed {tuple(packed.shape)} / group {group_size}")
    if m == 0:
        return x.new_empty((0, n))
    return w4_launch(x, packed, scales_and_zeros, group_size, w4_config(m, n, k, group_size, x.dtype))


@w4_mm.register_fake
def _(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    return x.new_empty((x.shape[0], packed.shape[0]))
