"""The computation of one decoder layer as plain functions, and `Ops`, the set a forward pass uses.

Shapes: B = batch rows, T = new tokens per row, H = query heads, Hk = KV heads, D = head dim,
S = cache positions read. `EAGER_OPS` are the plain functions; `Compiler.fused_ops()` makes a set whose
elementwise functions are torch.compile'd; `decode_attention_ops(name)` picks the attention a compiled
decode step traces.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from deepseek_serve.engine.runners.pytorch.config import ModelArgs
from deepseek_serve.engine.runners.pytorch.forward_batch import ForwardBatch


def rope_cache(args: ModelArgs, max_len: int, device: torch.device | str | None = None) -> Tensor:
    """float32 [max_len, 2, D]: cos and sign-folded sin (-sin on the first half), so that
    rope(x) = x * cos + swap_halves(x) * sin (Hugging Face's rotate-half layout)."""
    half = args.head_dim // 2
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, half, dtype=torch.int64, device=device).float() / half))
    pos = torch.arange(max_len, dtype=torch.float32, device=device) / args.rope_linear_factor
    freqs = torch.outer(pos, inv_freq)  # [S, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [S, D]
    sin = emb.sin()
    sin[:, :half] = -sin[:, :half]
    return torch.stack([emb.cos(), sin], dim=1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, h, D]; cos/sin [B, T, 1, D] in x's dtype (as transformers computes it)."""
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return x * cos + swapped * sin


def rope_pack(qkv: Tensor, cos: Tensor, sin: Tensor, h: int, hk: int) -> tuple[Tensor, Tensor]:
    """qkv [B, T, H + 2 Hk, D] -> (roped q [B, T, H, D], [roped k | v] [B, T, Hk, 2D])."""
    qk = apply_rope(qkv[:, :, : h + hk], cos, sin)
    return qk[:, :, :h], torch.cat([qk[:, :, h:], qkv[:, :, h + hk :]], dim=-1)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # float32 statistics, cast back, then the weight: transformers' LlamaRMSNorm exactly
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(rms_norm(x + residual), x + residual)."""
    h = x + residual
    return rms_norm(h, weight, eps), h


def silu_mul(gate_up: Tensor) -> Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def attend_sdpa(q: Tensor, kvs: Tensor, mask: Tensor, hk: int) -> Tensor:
    """q [B, T, H, D], kvs [B, Hk, S, 2D] (K | V), additive or bool mask [B, 1, T, S] -> [B, T, H * D]."""
    b, t, h, hd = q.shape
    g = h // hk
    keys, values = kvs[..., :hd], kvs[..., hd:]
    # GQA without copying KV: fold the g query heads of a KV head into the query length.
    qg = q.reshape(b, t, hk, g, hd).permute(0, 2, 3, 1, 4).reshape(b, hk, g * t, hd)  # [B, Hk, g*T, D]
    m = mask if g == 1 or t == 1 else mask.repeat(1, 1, g, 1)  # [B, 1, g*T or 1, S]
    out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=m)  # [B, Hk, g*T, D]
    return out.view(b, hk, g, t, hd).permute(0, 3, 1, 2, 4).reshape(b, t, h * hd)


def attend_causal(q: Tensor, kvs: Tensor, hk: int) -> Tensor:
    """One sequence's chunk of T new tokens at the end of its S cached positions (query i sits at
    position S - T + i): `attend_sdpa` with the causal mask aligned to the bottom right, which SDPA
    runs in its flash / memory-efficient kernels instead of materializing [T x S] scores per head.
    q [1, T, H, D], kvs [1, Hk, S, 2D] -> [1, T, H * D]. KV heads are repeated for GQA (a copy of
    this layer's S positions: small next to the scores it saves)."""
    from torch.nn.attention.bias import causal_lower_right

    b, t, h, hd = q.shape
    s = kvs.shape[2]
    keys, values = kvs[..., :hd], kvs[..., hd:]
    if h != hk:
        keys = keys.repeat_interleave(h // hk, dim=1)
        values = values.repeat_interleave(h // hk, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=causal_lower_right(t, s))
    return out.transpose(1, 2).reshape(b, t, h * hd)


def attend_reductions(q: Tensor, kvs: Tensor, mask: Tensor, hk: int) -> Tensor:
    """`attend_sdpa` for T == 1 and an additive mask, written as broadcast products and sums: meant to
    be traced by torch.compile, which turns it into a few fused reduction kernels (eager, it would
    materialize [B, Hk, g, S, D])."""
    b, _, h, hd = q.shape
    g = h // hk
    qf = q.reshape(b, hk, g, 1, hd).float()
    keys = kvs[..., :hd].unsqueeze(2).float()  # [B, Hk, 1, S, D]
    values = kvs[..., hd:].unsqueeze(2).float()
    scores = (qf * keys).sum(-1) * hd**-0.5 + mask.reshape(b, 1, 1, -1).float()  # [B, Hk, g, S]
    p = torch.softmax(scores, dim=-1)
    out = (p.unsqueeze(-1) * values).sum(-2)  # [B, Hk, g, D]
    return out.to(q.dtype).reshape(b, 1, h * hd)


def attend_chunk(q: Tensor, cache_l: Tensor, blocks: Tensor) -> Tensor:
    """Packed prompt chunks against their cached prefixes, read in place from this layer's cache
    `cache_l` [slots, Hk, S, 2D] (CUDA; the custom op is registered by importing `chunk_attention`).
    q [1, T, H, D], blocks [NB, 5] (the query blocks, see `packing`) -> [1, T, H * D]."""
    return torch.ops.deepseek_serve.chunk_attention(q, cache_l, blocks)


def register_decode_attention() -> None:
    """Registers the custom op `deepseek_serve::decode_attention` (imports the Triton kernels of
    `decode_attention`) before a traced step looks it up."""
    importlib.import_module("deepseek_serve.engine.runners.pytorch.decode_attention")


def attend_triton(q: Tensor, kvs: Tensor, lengths: Tensor) -> Tensor:
    """`attend_sdpa` for T == 1 through the split-KV Triton kernels (CUDA; the custom op is
    registered by `register_decode_attention`): reads each row's `lengths` positions, not the
    whole bucket."""
    return torch.ops.deepseek_serve.decode_attention(q, kvs, lengths)


DECODE_ATTENTIONS = ("sdpa", "reductions", "triton")


@dataclass(frozen=True)
class Ops:
    """The elementwise pieces of a layer and its attention. `attention`: "sdpa" (SDPA with the mask,
    or causal for a causal tail), "reductions" (`attend_reductions`) or "triton" (`attend_triton`);
    the last two are for one decode token per row. `gemv_down`: one-row MLPs run their down projection
    through the GEMV kernel that computes SiLU·up itself (`modules.mlp_partials`). `bias_apart`: plain
    linears add their bias after the matmul (`modules.project`), for a compiler that turns one-row
    matmuls into reductions but leaves a matmul with a bias (addmm) to cuBLAS, as Inductor does."""

    rms_norm: Callable[[Tensor, Tensor, float], Tensor]
    add_rms_norm: Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]
    silu_mul: Callable[[Tensor], Tensor]
    rope_pack: Callable[[Tensor, Tensor, Tensor, int, int], tuple[Tensor, Tensor]]
    attention: str = "sdpa"
    gemv_down: bool = False
    bias_apart: bool = False

    def attend(self, q: Tensor, kvs: Tensor, fb: ForwardBatch, hk: int) -> Tensor:
        if self.attention == "triton":
            assert fb.lengths is not None
            return attend_triton(q, kvs, fb.lengths)
        if fb.causal_tail:
            return attend_causal(q, kvs, hk)
        assert fb.mask is not None
        if self.attention == "reductions":
            return attend_reductions(q, kvs, fb.mask, hk)
        return attend_sdpa(q, kvs, fb.mask, hk)


EAGER_OPS = Ops(rms_norm, add_rms_norm, silu_mul, rope_pack)
_DECODE_OPS = (EAGER_OPS, replace(EAGER_OPS, attention="reductions"), replace(EAGER_OPS, attention="triton"))


def decode_attention_ops(attention: str) -> Ops:
    """The eager ops with the decode attention `attention` (one of DECODE_ATTENTIONS)."""
    if attention not in DECODE_ATTENTIONS:
        raise ValueError(f"unknown decode attention {attention!r} ({', '.join(DECODE_ATTENTIONS)})")
    return _DECODE_OPS[DECODE_ATTENTIONS.index(attention)]
