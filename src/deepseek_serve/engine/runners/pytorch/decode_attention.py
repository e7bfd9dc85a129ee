"""Split-KV decode attention (flash-decoding) in one Triton launch, for one new token per row.

A decode step's attention reads little (a 1.5B model's 2 KV heads x 256 positions are 0.26 MB per
layer), so its cost is latency, and SDPA's kernels spend it badly: with GQA folded into the query
length cuDNN runs one 64-row tile per KV head, two thread blocks in all for a lone stream (8 us per
layer on an H200, about a seventh of the layer). Here every (row, query head, block of KV positions)
gets its own program, which reads only the positions the row has (`lengths`, not the KV bucket):

1. each program: scores of one query head against BLOCK_N cached keys, their max `m`, the sum `l`
   of exp(score - m) and the exp-weighted sum of the values, into a float32 scratch;
2. the last program of a (row, head) to finish (an arrival counter, as the split-K sums of
   `quant_kernels`) rescales the blocks' partial sums to a common max, divides and writes the output,
   then resets its counter: no second launch. Where (row, head) pairs outnumber the counters a second
   kernel (`_combine`) does it.

With `cos` / `sin` the query is rotated (RoPE, the sign-folded table of `ops.rope_cache`) inside the
kernel and rounded to q's dtype, as `ops.apply_rope` would: the decode step then writes only the
rotated keys (a kernel that Inductor fuses with the cache write) and launches no RoPE kernel for q.

Shapes: q [B, 1, H, D] (any strides but the last: a view of the qkv projection); kv [B, Hk, S, 2D]
(K | V in the last dimension: a view of the runner's cache); lengths [B] (positions 0..length-1 are
attended); cos, sin [B, 1, 1, D] in q's dtype. Output [B, 1, H * D] in q's dtype. Registered as the
custom op `deepseek_serve::decode_attention`, so torch.compile keeps it as one opaque call and CUDA
graphs capture its launch. Launches on one device must not run concurrently on two streams (the
counters are shared). Import only where Triton is installed (CUDA, or Triton's CPU interpreter).
"""

# Triton kernel parameters are untyped pointers and scalars (Triton specializes on them)
# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_N = 64  # KV positions per program of the first pass
MAX_COUNTERS = 4096  # (row, head) pairs combined in the one launch; beyond, a second kernel combines
_COUNTERS: dict[torch.device, Tensor] = {}


@triton.jit
def _combine_row(
    part_ptr,
    stat_ptr,
    out_ptr,
    b,
    h,
    stride_ob,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_POW2: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_POW2: tl.constexpr,
):
    """Rescale the (row, head)'s block sums to a common max, divide, write the output row."""
    offs_s = tl.arange(0, SPLITS_POW2)
    offs_d = tl.arange(0, D_POW2)
    s_ok = offs_s < NUM_SPLITS
    row = (b * NUM_HEADS + h) * NUM_SPLITS + offs_s
    # .cg: read the other programs' partials from L2, past this SM's L1
    m = tl.load(stat_ptr + row * 2, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
    l_ = tl.load(stat_ptr + row * 2 + 1, mask=s_ok, other=0.0, cache_modifier=".cg")
    acc = tl.load(
        part_ptr + row[:, None] * D_POW2 + offs_d[None, :], mask=s_ok[:, None], other=0.0, cache_modifier=".cg"
    )
    m_all = tl.max(m, axis=0)  # finite: every row attends at least position 0
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_all))  # [SPLITS]
    out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l_, axis=0)
    tl.store(out_ptr + b * stride_ob + h * HEAD_DIM + offs_d, out, mask=offs_d < HEAD_DIM)


@triton.jit
def _partial(
    q_ptr,
    kv_ptr,
    len_ptr,
    cos_ptr,
    sin_ptr,
    part_ptr,
    stat_ptr,
    out_ptr,
    count_ptr,
    stride_qb,
    stride_qh,
    stride_kvb,
    stride_kvh,
    stride_kvs,
    stride_cb,
    stride_sb,
    stride_ob,
    scale,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_POW2: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_POW2: tl.constexpr,
    BLOCK: tl.constexpr,
    ROPE: tl.constexpr,  # rotate q by cos / sin first
    COMBINE: tl.constexpr,  # the last program of a (row, head) combines (else `_combine` does)
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(len_ptr + b)
    offs_n = split * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_POW2)
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < length
    q_row = q_ptr + b * stride_qb + h * stride_qh
    q = tl.load(q_row + offs_d, mask=d_ok, other=0.0)
    if ROPE:  # q * cos + swap_halves(q) * sin, rounded to q's dtype as the unfused RoPE would be
        HALF: tl.constexpr = HEAD_DIM // 2
        swapped = tl.load(q_row + tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF), mask=d_ok, other=0.0)
        c = tl.load(cos_ptr + b * stride_cb + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + b * stride_sb + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        q = (q.to(tl.float32) * c + swapped.to(tl.float32) * s).to(q_ptr.dtype.element_ty)
    q = q.to(tl.float32)
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
    if COMBINE:
        tl.debug_barrier()  # every thread's partial is written before the arrival is published
        arrived = tl.atomic_add(count_ptr + b * NUM_HEADS + h, 1, sem="acq_rel")
        if arrived == NUM_SPLITS - 1:
            _combine_row(
                part_ptr, stat_ptr, out_ptr, b, h, stride_ob, NUM_HEADS, HEAD_DIM, D_POW2, NUM_SPLITS, SPLITS_POW2
            )
            tl.atomic_xchg(count_ptr + b * NUM_HEADS + h, 0)


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
    _combine_row(
        part_ptr,
        stat_ptr,
        out_ptr,
        tl.program_id(0),
        tl.program_id(1),
        stride_ob,
        NUM_HEADS,
        HEAD_DIM,
        D_POW2,
        NUM_SPLITS,
        SPLITS_POW2,
    )


def _counters(device: torch.device) -> Tensor:
    """The per-device arrival counters (zero between launches)."""
    if device not in _COUNTERS:
        _COUNTERS[device] = torch.zeros(MAX_COUNTERS, dtype=torch.int32, device=device)
    return _COUNTERS[device]


@torch.library.custom_op("deepseek_serve::decode_attention", mutates_args=())
def decode_attention(
    q: Tensor, kv: Tensor, lengths: Tensor, cos: Tensor | None = None, sin: Tensor | None = None
) -> Tensor:
    """q [B, 1, H, D], kv [B, Hk, S, 2D], lengths [B] int, optional cos / sin [B, 1, 1, D] (q is
    rotated by them first) -> [B, 1, H * D]."""
    b, t, h, d = q.shape
    hk, s = kv.shape[1], kv.shape[2]
    if t != 1 or kv.shape[3] != 2 * d or h % hk or q.stride(3) != 1 or kv.stride(3) != 1:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} / kv {tuple(kv.shape)} not one decode token")
    tables = [t for t in (cos, sin) if t is not None]
    if len(tables) == 1 or any(t.shape != (b, 1, 1, d) or t.stride(3) != 1 for t in tables):
        raise ValueError(f"decode_attention: cos / sin must both be [B, 1, 1, D] = {(b, 1, 1, d)}")
    rope = len(tables) == 2
    if rope and d % 2:
        raise ValueError(f"decode_attention: RoPE needs an even head dim, not {d}")
    cos_t, sin_t = tables if rope else (q, q)  # q: a placeholder pointer the kernel does not read
    d_pow2 = triton.next_power_of_2(d)
    splits = triton.cdiv(s, BLOCK_N)
    splits_pow2 = triton.next_power_of_2(splits)
    part = torch.empty((b, h, splits, d_pow2), dtype=torch.float32, device=q.device)
    stat = torch.empty((b, h, splits, 2), dtype=torch.float32, device=q.device)
    out = torch.empty((b, 1, h * d), dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    combine = b * h <= MAX_COUNTERS
    _partial[(b, h, splits)](
        q,
        kv,
        lengths,
        cos_t,
        sin_t,
        part,
        stat,
        out,
        _counters(q.device) if combine else lengths,
        q.stride(0),
        q.stride(2),
        kv.stride(0),
        kv.stride(1),
        kv.stride(2),
        cos_t.stride(0),
        sin_t.stride(0),
        out.stride(0),
        d**-0.5,
        NUM_HEADS=h,
        GROUP=h // hk,
        HEAD_DIM=d,
        D_POW2=d_pow2,
        NUM_SPLITS=splits,
        SPLITS_POW2=splits_pow2,
        BLOCK=BLOCK_N,
        ROPE=rope,
        COMBINE=combine,
    )
    if not combine:
        _combine[(b, h)](
            part,
            stat,
            out,
            out.stride(0),
            NUM_HEADS=h,
            HEAD_DIM=d,
            D_POW2=d_pow2,
            NUM_SPLITS=splits,
            SPLITS_POW2=splits_pow2,
        )
    return out


@decode_attention.register_fake
def _(q: Tensor, kv: Tensor, lengths: Tensor, cos: Tensor | None = None, sin: Tensor | None = None) -> Tensor:
    b, _, h, d = q.shape
    return q.new_empty((b, 1, h * d))
