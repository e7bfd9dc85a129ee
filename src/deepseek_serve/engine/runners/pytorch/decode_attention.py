"""Split-KV decode attention (flash-decoding) as two Triton kernels, for one new token per row.

A decode step's attention reads little (a 1.5B model's 2 KV heads x 256 positions are 0.26 MB per
layer), so its cost is latency, and SDPA's kernels spend it badly: with GQA folded into the query
length cuDNN runs one 64-row tile per KV head, two thread blocks in all for a lone stream (8 us per
layer on an H200, about a seventh of the layer). Here every (row, query head, block of KV positions)
gets its own program, which reads only the positions the row has (`lengths`, not the KV bucket):

1. `_partial`: scores of one query head against BLOCK_N cached keys, their max `m`, the sum `l` of
   exp(score - m) and the exp-weighted sum of the values, into a float32 scratch;
2. `_combine`: per (row, head), rescales the blocks' partial sums to a common max and divides.

Shapes: q [B, 1, H, D]; kv [B, Hk, S, 2D] (K | V in the last dimension: a view of the runner's
cache); lengths [B] (positions 0..length-1 are attended). Output [B, 1, H * D] in q's dtype.
Registered as the custom op `deepseek_serve::decode_attention`, so torch.compile keeps it as one
opaque call and CUDA graphs capture both launches. Import only where Triton is installed (CUDA).
"""

# Triton kernel parameters are untyped pointers and scalars (Triton specializes on them)
# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_N = 64  # KV positions per program of the first pass


@triton.jit
def _partial(
    q_ptr,
    kv_ptr,
    len_ptr,
    part_ptr,
    stat_ptr,
    stride_qb,
    stride_qh,
    stride_kvb,
    stride_kvh,
    stride_kvs,
    scale,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_POW2: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(len_ptr + b)
    offs_n = split * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_POW2)
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < length
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    base = kv_ptr + b * stride_kvb + (h // GROUP) * stride_kvh + offs_n[:, None] * stride_kvs
    ok = n_ok[:, None] & d_ok[None, :]
    k = tl.load(base + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)  # [BLOCK, D]
    scores = tl.sum(k * q[None, :], axis=1) * scale  # [BLOCK]
    scores = tl.where(n_ok, scores, float("-inf"))
    m = tl.max(scores, axis=0)
    # a block past the row's length has no key: m = -inf, p = 0, l = 0 (the combine weighs it 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    p = tl.where(n_ok, tl.exp(scores - m_safe), 0.0)
    v = tl.load(base + HEAD_DIM + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    acc = tl.sum(p[:, None] * v, axis=0)  # [D]
    row = (b * NUM_HEADS + h) * NUM_SPLITS + split
    tl.store(part_ptr + row * D_POW2 + offs_d, acc)
    tl.store(stat_ptr + row * 2, m)
    tl.store(stat_ptr + row * 2 + 1, tl.sum(p, axis=0))


@triton.jit
def _combine(
    part_ptr,
    stat_ptr,
    out_ptr,
    stride_ob,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_POW2: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_POW2: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_POW2)
    offs_d = tl.arange(0, D_POW2)
    s_ok = offs_s < NUM_SPLITS
    row = (b * NUM_HEADS + h) * NUM_SPLITS + offs_s
    m = tl.load(stat_ptr + row * 2, mask=s_ok, other=float("-inf"))
    l_ = tl.load(stat_ptr + row * 2 + 1, mask=s_ok, other=0.0)
    acc = tl.load(part_ptr + row[:, None] * D_POW2 + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    m_all = tl.max(m, axis=0)  # finite: every row attends at least position 0
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_all))  # [SPLITS]
    out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l_, axis=0)
    tl.store(out_ptr + b * stride_ob + h * HEAD_DIM + offs_d, out, mask=offs_d < HEAD_DIM)


@torch.library.custom_op("deepseek_serve::decode_attention", mutates_args=())
def decode_attention(q: Tensor, kv: Tensor, lengths: Tensor) -> Tensor:
    """q [B, 1, H, D], kv [B, Hk, S, 2D], lengths [B] int -> [B, 1, H * D]."""
    b, t, h, d = q.shape
    hk, s = kv.shape[1], kv.shape[2]
    if t != 1 or kv.shape[3] != 2 * d or h % hk or q.stride(3) != 1 or kv.stride(3) != 1:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} / kv {tuple(kv.shape)} not one decode token")
    d_pow2 = triton.next_power_of_2(d)
    splits = triton.cdiv(s, BLOCK_N)
    part = torch.empty((b, h, splits, d_pow2), dtype=torch.float32, device=q.device)
    stat = torch.empty((b, h, splits, 2), dtype=torch.float32, device=q.device)
    out = torch.empty((b, 1, h * d), dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    _partial[(b, h, splits)](
        q,
        kv,
        lengths,
        part,
        stat,
        q.stride(0),
        q.stride(2),
        kv.stride(0),
        kv.stride(1),
        kv.stride(2),
        d**-0.5,
        NUM_HEADS=h,
        GROUP=h // hk,
        HEAD_DIM=d,
        D_POW2=d_pow2,
        NUM_SPLITS=splits,
        BLOCK=BLOCK_N,
    )
    _combine[(b, h)](
        part,
        stat,
        out,
        out.stride(0),
        NUM_HEADS=h,
        HEAD_DIM=d,
        D_POW2=d_pow2,
        NUM_SPLITS=splits,
        SPLITS_POW2=triton.next_power_of_2(splits),
    )
    return out


@decode_attention.register_fake
def _(q: Tensor, kv: Tensor, lengths: Tensor) -> Tensor:
    b, _, h, d = q.shape
    return q.new_empty((b, 1, h * d))
