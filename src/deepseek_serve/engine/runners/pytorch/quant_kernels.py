"""Weight-only int8 / int4 matmuls in Triton: y[M, N] = x[M, K] @ dequant(w)[N, K]^T, the weights
read once and dequantized in registers.

- `w8_mm`: int8 weights [N, K] with one scale per output channel: acc += x @ w.to(x.dtype) over K
  tiles, times the scales at the end.
- `w4_mm`: int4 codes packed two per byte, [N, K / 2] uint8, in groups of G along K: byte j of
  group g holds code (g, j) in its low nibble and code (g, j + G/2) in its high nibble, so one group
  is two [BM, G/2] x [G/2, BN] dots. Scales and zeros are tinygemm's [K / G, N, 2] (value =
  (code - 8) * scale + zero); with them factored out of the dot, a group adds
  dot(x, codes) * scale + rowsum(x) * (zero - 8 * scale), and dequantizing is one int -> bf16 cast.

Few rows leave most SMs idle (one program per BM x BN tile), so K is split over SPLIT_K programs
writing float32 partial sums that one sum reduces (deterministic, unlike atomics). Both are custom
ops (`deepseek_serve::w8_mm`, `deepseek_serve::w4_mm`): torch.compile keeps each as one opaque call
and CUDA graphs capture its launches. CUDA, or Triton's CPU interpreter in tests.
"""

# Triton kernel parameters are untyped pointers and scalars (Triton specializes on them).
# Integer -> bf16 casts go through float32: exact, what the compiler emits anyway, and Triton's CPU
# interpreter reinterprets the bits of a direct int -> bf16 cast.
# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_K8 = 128  # K per iteration of the int8 kernel
TARGET_PROGRAMS = 264  # about two programs per SM of an H100 / H200 (132 SMs)


@triton.jit
def _w8_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    part_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    K_PER_SPLIT,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for kk in range(0, K_PER_SPLIT, BK):
        rk = k_start + kk + tl.arange(0, BK)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + rk[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0)
        acc += tl.dot(x, w.to(tl.float32).to(x.dtype))
    s = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    acc = acc * s[None, :]
    out = part_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :]
    tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _w4_kernel(
    x_ptr,
    w_ptr,
    sz_ptr,
    part_ptr,
    M,
    N,
    stride_xm,
    stride_wn,
    NUM_GROUPS,
    GROUPS_PER_SPLIT,
    GROUP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    HALF: tl.constexpr = GROUP // 2
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rh = tl.arange(0, HALF)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    g_start = pid_k * GROUPS_PER_SPLIT
    g_end = tl.minimum(g_start + GROUPS_PER_SPLIT, NUM_GROUPS)
    for g in range(g_start, g_end):
        xs = x_ptr + rm[:, None] * stride_xm + g * GROUP + rh[None, :]
        x_lo = tl.load(xs, mask=m_ok[:, None], other=0.0)
        x_hi = tl.load(xs + HALF, mask=m_ok[:, None], other=0.0)
        b = tl.load(w_ptr + rn[None, :] * stride_wn + g * HALF + rh[:, None], mask=n_ok[None, :], other=0)
        lo = (b & 0xF).to(tl.float32).to(x_lo.dtype)
        hi = (b >> 4).to(tl.float32).to(x_lo.dtype)
        part = tl.dot(x_lo, lo) + tl.dot(x_hi, hi)
        x_sum = tl.sum(x_lo.to(tl.float32), axis=1) + tl.sum(x_hi.to(tl.float32), axis=1)
        scale = tl.load(sz_ptr + g * N * 2 + rn * 2, mask=n_ok, other=0.0).to(tl.float32)
        zero = tl.load(sz_ptr + g * N * 2 + rn * 2 + 1, mask=n_ok, other=0.0).to(tl.float32)
        acc += part * scale[None, :] + x_sum[:, None] * (zero - 8.0 * scale)[None, :]
    out = part_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :]
    tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])


def _num_programs_target(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return TARGET_PROGRAMS


def _tiles(m: int, n: int) -> tuple[int, int]:
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    bn = 64 if m <= 32 else 128
    return bm, bn


def _splits(tiles: int, k_steps: int, target: int) -> int:
    """K splits that bring the programs near `target`, each split keeping at least 2 K steps."""
    return max(1, min(target // max(tiles, 1), k_steps // 2))


def _finish(part: Tensor, dtype: torch.dtype) -> Tensor:
    return (part[0] if part.shape[0] == 1 else part.sum(0)).to(dtype)


@torch.library.custom_op("deepseek_serve::w8_mm", mutates_args=())
def w8_mm(x: Tensor, w: Tensor, scales: Tensor) -> Tensor:
    """x [M, K] float, w [N, K] int8, scales [N] -> [M, N] in x's dtype."""
    m, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k or x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"w8_mm: x {tuple(x.shape)} / w {tuple(w.shape)}")
    if m == 0:
        return x.new_empty((0, n))
    bm, bn = _tiles(m, n)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = _splits(tiles, triton.cdiv(k, BLOCK_K8), _num_programs_target(x.device))
    k_per = triton.cdiv(triton.cdiv(k, split), BLOCK_K8) * BLOCK_K8
    split = triton.cdiv(k, k_per)
    part = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), split)
    _w8_kernel[grid](x, w, scales, part, m, n, k, x.stride(0), w.stride(0), k_per, BM=bm, BN=bn, BK=BLOCK_K8)
    return _finish(part, x.dtype)


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
    sz = scales_and_zeros.contiguous()
    bm, bn = _tiles(m, n)
    groups = k // group_size
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = _splits(tiles, groups, _num_programs_target(x.device))
    per = triton.cdiv(groups, split)
    split = triton.cdiv(groups, per)
    part = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), split)
    _w4_kernel[grid](
        x, packed, sz, part, m, n, x.stride(0), packed.stride(0), groups, per, GROUP=group_size, BM=bm, BN=bn
    )
    return _finish(part, x.dtype)


@w4_mm.register_fake
def _(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    return x.new_empty((x.shape[0], packed.shape[0]))
