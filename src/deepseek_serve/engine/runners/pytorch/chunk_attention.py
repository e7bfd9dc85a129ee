"""Chunk attention: the prompt chunks of one or several sequences (packed into one token buffer)
against their cached prefixes, read in place from the slot KV cache, as one Triton kernel (flash
attention with an online softmax).

The T query tokens are cut into query blocks of at most BLOCK_M tokens that never straddle two
sequences. Block b is one row of the device table `blocks` [NB, 5] int64: (slot, pos, offset, count,
width): its tokens are rows offset .. offset + width - 1 of q; token i < count sits at position
pos + i of slot `slot` and attends causally to that slot's cache positions 0 .. pos + i; tokens
count <= i < width are padding (output zero); a row of width 0 is an unused entry (its programs exit
at once). The blocks' token ranges cover every row of q exactly once (`packed_blocks` builds such a
table). Everything is read from device tensors, so one CUDA graph per (T, NB) serves every mix of
slots, positions and lengths: the loop over KV blocks ends at each block's own last position.

Against SDPA over the runner's cache (the eager path): no gather of the slots' positions per layer,
no repeat of the KV heads for GQA, no mask. Each program takes one query block of one query head and
one of `kv_splits` shares of the positions it sees: a short chunk at a long prefix has few query
blocks, and one program walking thousands of positions alone left most SMs idle (an H200 ran 96
programs for a 449-token chunk at position 7,000 at 73-107 TFLOP/s). With more than one split the
programs write float32 partial sums and a second kernel (`_combine`) merges them, as in
`decode_attention`.

Shapes: q [1, T, H, D]; kv [slots, Hk, S, 2D] (K | V in the last dimension: one layer of the runner's
cache); blocks [NB, 5] int64. Output [1, T, H * D] in q's dtype. Registered as the custom op
`deepseek_serve::chunk_attention`. Import only where Triton is installed (CUDA, or its CPU
interpreter in the tests).
"""

# Triton kernel parameters are untyped pointers and scalars (Triton specializes on them)
# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from deepseek_serve.engine.runners.pytorch.packing import BLOCK_M

# tile sizes (query tokens: BLOCK_M, a query block of `packing`; KV positions per inner step) and
# launch parameters of the kernel
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 3
MAX_SPLITS = 32  # KV splits per query block at most (`kv_splits`)
MIN_SPLIT_BLOCKS = 4  # KV blocks per split at least
LOG2E = 1.4426950408889634  # scores are scaled to base 2 (exp2 is the hardware's)


@triton.jit
def _kv_block(
    acc,
    m_i,
    l_i,
    q,
    base,
    n0,
    end,
    q_pos,
    offs_d,
    d_ok,
    stride_kvs,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One online-softmax step over positions n0 .. n0 + BLOCK_N; MASKED: apply the causal mask and
    the chunk's end (blocks wholly before the query block's first position need neither)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k_ptrs = base + offs_n[None, :] * stride_kvs + offs_d[:, None]  # [D, N]
    v_ptrs = base + HEAD_DIM + offs_n[:, None] * stride_kvs + offs_d[None, :]  # [N, D]
    if MASKED:
        n_ok = offs_n < end
        k = tl.load(k_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    # float32 inputs: exact products (the default would round them to tf32); scores in log2 units
    s = (tl.dot(q, k, input_precision="ieee") if IEEE else tl.dot(q, k)) * qk_scale  # [M, N]
    if MASKED:
        s = tl.where(offs_n[None, :] <= q_pos[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if MASKED:  # a row may see none of a split's positions yet: keep its sums at 0, not NaN
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    pv = tl.dot(p, v, input_precision="ieee") if IEEE else tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _chunk_attention(
    q_ptr,
    kv_ptr,
    blocks_ptr,
    out_ptr,
    stride_qt,
    stride_qh,
    stride_kvb,
    stride_kvh,
    stride_kvs,
    stride_ot,
    part_ptr,
    stat_ptr,
    num_splits,
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_POW2: tl.constexpr,
    IEEE: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    mb = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    slot = tl.load(blocks_ptr + mb * 5)
    start = tl.load(blocks_ptr + mb * 5 + 1)
    offset = tl.load(blocks_ptr + mb * 5 + 2)
    count = tl.load(blocks_ptr + mb * 5 + 3)
    width = tl.load(blocks_ptr + mb * 5 + 4)  # 0: an unused entry, every mask below is empty
    offs_i = tl.arange(0, BLOCK_M)
    offs_m = offset + offs_i  # rows of q / out
    offs_d = tl.arange(0, D_POW2)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_i < width
    q = tl.load(
        q_ptr + offs_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    # the last position each query sees (padding queries: the block's last)
    q_pos = start + tl.minimum(offs_i, count - 1)
    # positions this block reads: up to its last real query's; none for a block of padding only
    end = tl.where(count > 0, start + count, 0)
    # KV blocks before `unmasked` are seen whole by every query of this block
    unmasked = tl.minimum((start + 1) // BLOCK_N * BLOCK_N, end)
    base = kv_ptr + slot * stride_kvb + (h // GROUP) * stride_kvh
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D_POW2), dtype=tl.float32)
    # this program's share of the positions: split `split` of `num_splits` (whole KV blocks)
    span = tl.cdiv(tl.cdiv(end, num_splits), BLOCK_N) * BLOCK_N
    lo = split * span
    hi = tl.minimum(lo + span, end)
    for n0 in range(lo, tl.minimum(unmasked, hi), BLOCK_N):
        acc, m_i, l_i = _kv_block(
            acc, m_i, l_i, q, base, n0, end, q_pos, offs_d, d_ok, stride_kvs, qk_scale, HEAD_DIM, IEEE, BLOCK_N, False
        )
    for n0 in range(tl.maximum(unmasked, lo), hi, BLOCK_N):
        acc, m_i, l_i = _kv_block(
            acc, m_i, l_i, q, base, n0, end, q_pos, offs_d, d_ok, stride_kvs, qk_scale, HEAD_DIM, IEEE, BLOCK_N, True
        )
    real = offs_i < count
    if SPLIT:
        # float32 partials [T, H, splits, D] and (max, sum) [T, H, splits, 2]; a row that saw nothing
        # here (or a padding row) has l = 0 and max -inf (the combine weighs it 0)
        row = (offs_m * NUM_HEADS + h) * num_splits + split
        tl.store(part_ptr + row[:, None] * D_POW2 + offs_d[None, :], acc, mask=m_ok[:, None])
        tl.store(stat_ptr + row * 2, tl.where(l_i == 0.0, float("-inf"), m_i), mask=m_ok)
        tl.store(stat_ptr + row * 2 + 1, l_i, mask=m_ok)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        out = tl.where(real[:, None], out, 0.0)  # padding queries: zeros
        tl.store(
            out_ptr + offs_m[:, None] * stride_ot + h * HEAD_DIM + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=m_ok[:, None] & d_ok[None, :],
        )


@triton.jit
def _combine(
    part_ptr,
    stat_ptr,
    out_ptr,
    stride_ot,
    num_splits,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_POW2: tl.constexpr,
    SPLITS_POW2: tl.constexpr,
):
    """Per (token, head): the splits' partial sums rescaled to a common max (base 2), divided (a
    padding token saw nothing in any split: zeros)."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_POW2)
    offs_d = tl.arange(0, D_POW2)
    s_ok = offs_s < num_splits
    row = (t * NUM_HEADS + h) * num_splits + offs_s
    m = tl.load(stat_ptr + row * 2, mask=s_ok, other=float("-inf"))
    l_ = tl.load(stat_ptr + row * 2 + 1, mask=s_ok, other=0.0)
    acc = tl.load(part_ptr + row[:, None] * D_POW2 + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    m_all = tl.max(m, axis=0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)  # padding tokens
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_all))  # [SPLITS]
    total = tl.sum(w * l_, axis=0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + t * stride_ot + h * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


@torch.library.custom_op("deepseek_serve::chunk_attention", mutates_args=())
def chunk_attention(q: Tensor, kv: Tensor, blocks: Tensor) -> Tensor:
    """q [1, T, H, D], kv [slots, Hk, S, 2D], blocks [NB, 5] int64 (slot, pos, offset, count, width per
    query block, covering the T rows; see the module docstring) -> [1, T, H * D]."""
    b, t, h, d = q.shape
    hk = kv.shape[1]
    if b != 1 or kv.shape[3] != 2 * d or h % hk or q.stride(3) != 1 or kv.stride(3) != 1:
        raise ValueError(f"chunk_attention: q {tuple(q.shape)} / kv {tuple(kv.shape)} not one packed chunk row")
    if blocks.dim() != 2 or blocks.shape[1] != 5 or not blocks.is_contiguous():
        raise ValueError(f"chunk_attention: blocks {tuple(blocks.shape)} is not a contiguous [NB, 5] table")
    out = torch.empty((1, t, h * d), dtype=q.dtype, device=q.device)
    if t == 0 or blocks.shape[0] == 0:
        return out
    d_pow2 = max(16, triton.next_power_of_2(d))
    splits = kv_splits(t, h, kv.shape[2], q.device)
    part = torch.empty((t, h, splits, d_pow2) if splits > 1 else (1,), dtype=torch.float32, device=q.device)
    stat = torch.empty((t, h, splits, 2) if splits > 1 else (1,), dtype=torch.float32, device=q.device)
    _chunk_attention[(blocks.shape[0], h, splits)](
        q,
        kv,
        blocks,
        out,
        q.stride(1),
        q.stride(2),
        kv.stride(0),
        kv.stride(1),
        kv.stride(2),
        out.stride(1),
        part,
        stat,
        splits,
        d**-0.5 * LOG2E,
        GROUP=h // hk,
        HEAD_DIM=d,
        D_POW2=d_pow2,
        IEEE=q.dtype == torch.float32,
        NUM_HEADS=h,
        SPLIT=splits > 1,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    if splits > 1:
        _combine[(t, h)](
            part,
            stat,
            out,
            out.stride(1),
            splits,
            NUM_HEADS=h,
            HEAD_DIM=d,
            D_POW2=d_pow2,
            SPLITS_POW2=triton.next_power_of_2(splits),
        )
    return out


def kv_splits(tokens: int, heads: int, positions: int, device: torch.device) -> int:
    """KV splits per (query block, head): enough programs for about two per SM when the T tokens are
    one sequence's chunk (a short chunk at a long prefix has few query blocks), each split keeping at
    least MIN_SPLIT_BLOCKS KV blocks of the cache's `positions`. Fixed per T, so a CUDA graph keeps it."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    programs = triton.cdiv(tokens, BLOCK_M) * heads
    return max(1, min(triton.cdiv(2 * sms, programs), positions // (BLOCK_N * MIN_SPLIT_BLOCKS), MAX_SPLITS))


@chunk_attention.register_fake
def _(q: Tensor, kv: Tensor, blocks: Tensor) -> Tensor:
    _, t, h, d = q.shape
    return q.new_empty((1, t, h * d))
