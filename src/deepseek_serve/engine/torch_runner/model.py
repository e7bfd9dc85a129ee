"""A compact Llama / Qwen2 decoder (gpt-fast style) that reads and writes a slot KV cache.

One module serves both architectures: Qwen2 differs only by a bias on q/k/v. Shapes use
B = batch rows, T = new tokens per row, H = query heads, Hk = KV heads, D = head dim, S = cache length.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not implemented by this runner."""


@dataclass(frozen=True)
class ModelArgs:
    """The architecture fields of a Hugging Face `config.json` that change the computation."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_linear_factor: float  # 1.0 = no scaling; positions are divided by it ("linear" rope_scaling)
    max_position_embeddings: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        archs = cfg.get("architectures") or []
        arch = (
            archs[0]
            if archs
            else {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(
                str(cfg.get("model_type")), str(cfg.get("model_type"))
            )
        )
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {arch!r} is not supported by the torch runner (supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {cfg.get('hidden_act')!r} is not supported (only silu)")
        if cfg.get("use_sliding_window"):
            raise UnsupportedModelError("sliding-window attention is not supported")
        # NOTE: transformers < 5 writes `rope_scaling` + `rope_theta`; 5.x writes `rope_parameters`.
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        factor = float(rope.get("factor") or scaling.get("factor") or 1.0)
        if rope_type not in ("default", "linear"):
            raise UnsupportedModelError(f"rope type {rope_type!r} is not supported (default, linear)")
        if rope_type == "default":
            factor = 1.0
        theta = float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        is_qwen2 = arch == "Qwen2ForCausalLM"
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_linear_factor=factor,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            qkv_bias=is_qwen2 or bool(cfg.get("attention_bias", False)),
            o_bias=(not is_qwen2) and bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_dir(cls, path: Path) -> ModelArgs:
        return cls.from_config(json.loads((path / "config.json").read_text(encoding="utf-8")))

    @property
    def num_params(self) -> int:
        d, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        per_layer = attn + 3 * d * i + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + d


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return OPS.rms_norm(x, self.weight, self.eps)


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
    # NOTE: float32 statistics, cast back, then the weight: transformers' LlamaRMSNorm exactly.
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


def attend_triton(q: Tensor, kvs: Tensor, lengths: Tensor) -> Tensor:
    """`attend_sdpa` for T == 1 through the split-KV Triton kernels (CUDA; the custom op is
    registered by importing `decode_attention`): reads each row's `lengths` positions, not the
    whole bucket."""
    return torch.ops.deepseek_serve.decode_attention(q, kvs, lengths)


class _Ops:
    """The elementwise pieces and the attention; `use_compiled_ops()` swaps torch.compile'd (fused)
    versions into `OPS`. `EAGER_OPS` always holds the plain functions (what a whole-step compile traces)."""

    rms_norm = staticmethod(rms_norm)
    add_rms_norm = staticmethod(add_rms_norm)
    silu_mul = staticmethod(silu_mul)
    rope_pack = staticmethod(rope_pack)

    @staticmethod
    def attend(q: Tensor, kvs: Tensor, fb: ForwardBatch, hk: int) -> Tensor:
        if fb.causal_tail:
            return attend_causal(q, kvs, hk)
        return attend_sdpa(q, kvs, fb.mask, hk)


class _ReductionAttentionOps(_Ops):
    @staticmethod
    def attend(q: Tensor, kvs: Tensor, fb: ForwardBatch, hk: int) -> Tensor:
        return attend_reductions(q, kvs, fb.mask, hk)


class _TritonAttentionOps(_Ops):
    @staticmethod
    def attend(q: Tensor, kvs: Tensor, fb: ForwardBatch, hk: int) -> Tensor:
        assert fb.lengths is not None
        return attend_triton(q, kvs, fb.lengths)


OPS = _Ops()
EAGER_OPS = _Ops()
DECODE_ATTENTION_OPS: dict[str, _Ops] = {
    "sdpa": EAGER_OPS,
    "reductions": _ReductionAttentionOps(),
    "triton": _TritonAttentionOps(),
}


def _raise_recompile_limits() -> None:
    # NOTE: sizes 0/1 are specialized (decode vs prefill, one row vs many) and each model shape compiles
    # its own code: a handful of compiles per function
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)


def use_compiled_ops() -> None:
    """Fuse the elementwise ops with torch.compile (dynamic shapes: one compile serves every batch).
    CUDA only; numerics are those of the eager ops up to rounding order."""
    _raise_recompile_limits()
    for name in ("rms_norm", "add_rms_norm", "silu_mul", "rope_pack"):
        setattr(OPS, name, torch.compile(globals()[name], dynamic=True, fullgraph=True))


@dataclass
class ForwardBatch:
    """Where each row's new tokens go in the cache and what they may attend to.

    Rows map to cache slots through `slots`. `write_pos` is the cache position of each new token
    (a scratch position for padding rows); `mask` [B, 1, T, S] is True where a query may attend, and
    its last dimension S is the number of cache positions read.
    """

    slots: Tensor | None  # [B] int64; None = rows are slots 0..B-1 (decode over a slot range)
    positions: Tensor  # [B, T] int64 rope positions
    write_pos: Tensor  # [B, T] int64 cache positions
    mask: Tensor  # [B, 1, T, S] additive (0 / -inf) or bool
    rows: Tensor | None = None  # [B, T] int64 cache slot of each new token (built once per forward)
    lengths: Tensor | None = None  # [B] int64 positions attended (decode with the Triton attention)
    causal_tail: bool = False  # one row whose T new tokens are the last T of the S positions read

    def __post_init__(self) -> None:
        if self.rows is None:
            b, t = self.positions.shape
            slots = self.slots if self.slots is not None else torch.arange(b, device=self.positions.device)
            self.rows = slots.unsqueeze(1).expand(b, t)


class KVCache(nn.Module):
    """One static buffer [layers, slots, Hk, max_len + 1, 2 * D]: K in the first half of the last
    dimension, V in the second, so one scatter per layer writes both. The last position is a scratch
    column that padding rows write to and nothing reads."""

    kv: Tensor

    def __init__(
        self, args: ModelArgs, num_slots: int, max_len: int, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        super().__init__()
        shape = (args.num_layers, num_slots, args.num_kv_heads, max_len + 1, 2 * args.head_dim)
        self.register_buffer("kv", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class Attention(nn.Module):
    """q, k and v projections are fused into `qkv_proj` ([H + 2 Hk] * D outputs) at load time."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        d = args.hidden_size
        self.qkv_proj = nn.Linear(d, (args.num_heads + 2 * args.num_kv_heads) * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, d, bias=args.o_bias)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], cache_l: Tensor, fb: ForwardBatch, ops: _Ops = OPS
    ) -> Tensor:
        """`cache_l` [slots, Hk, S_max + 1, 2D] is this layer's part of `KVCache.kv`."""
        b, t, _ = x.shape
        h, hk, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x).view(b, t, h + 2 * hk, hd)
        q, kv = ops.rope_pack(qkv, rope[0], rope[1], h, hk)  # [B, T, H, D], [B, T, Hk, 2D]
        s = fb.mask.shape[-1]
        cache_l[fb.rows, :, fb.write_pos] = kv
        # decode over a slot range: row i is slot i (a view); else gather the rows' slots
        kvs = cache_l[:b, :, :s] if fb.slots is None else cache_l[fb.slots, :, :s]  # [B, Hk, S, 2D]
        return self.o_proj(ops.attend(q, kvs, fb, hk))


class MLP(nn.Module):
    """gate and up projections fused into `gate_up_proj` (2 * intermediate outputs) at load time."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        d, i = args.hidden_size, args.intermediate_size
        self.gate_up_proj = nn.Linear(d, 2 * i, bias=args.mlp_bias)
        self.down_proj = nn.Linear(i, d, bias=args.mlp_bias)

    def forward(self, x: Tensor, ops: _Ops = OPS) -> Tensor:
        return self.down_proj(ops.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(
        self,
        x: Tensor,
        residual: Tensor | None,
        rope: tuple[Tensor, Tensor],
        cache_l: Tensor,
        fb: ForwardBatch,
        ops: _Ops = OPS,
    ) -> tuple[Tensor, Tensor]:
        """(x, residual) -> (mlp output, residual before it); the caller adds the last pair."""
        n1, n2 = self.input_layernorm, self.post_attention_layernorm
        if residual is None:
            h, residual = ops.rms_norm(x, n1.weight, n1.eps), x
        else:
            h, residual = ops.add_rms_norm(x, residual, n1.weight, n1.eps)
        a = self.self_attn(h, rope, cache_l, fb, ops)
        h, residual = ops.add_rms_norm(a, residual, n2.weight, n2.eps)
        return self.mlp(h, ops), residual


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class CausalLM(nn.Module):
    """Parameter names follow Hugging Face's (`model.layers.N.self_attn...`, `lm_head.weight`) except
    the fused projections; `fuse_hf_state_dict` maps a checkpoint's state dict onto them."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rope: Tensor | None = None  # [max_len, 2, D] float32, set by setup_rope

    def setup_rope(self, max_len: int, device: torch.device | str) -> None:
        self.rope = rope_cache(self.args, max_len, device)

    def hidden_states(self, tokens: Tensor, cache: KVCache, fb: ForwardBatch) -> Tensor:
        """tokens [B, T] -> final-norm hidden states [B, T, d]."""
        assert self.rope is not None, "call setup_rope first"
        x = self.model.embed_tokens(tokens)
        cs = self.rope[fb.positions].to(x.dtype)  # [B, T, 2, D]
        rope = (cs[:, :, 0:1], cs[:, :, 1:2])  # cos, sin: [B, T, 1, D]
        residual: Tensor | None = None
        for layer, cache_l in zip(self.model.layers, cache.kv, strict=True):
            x, residual = layer(x, residual, rope, cache_l, fb)
        assert residual is not None
        h, _ = OPS.add_rms_norm(x, residual, self.model.norm.weight, self.model.norm.eps)
        return h

    def forward(self, tokens: Tensor, cache: KVCache, fb: ForwardBatch) -> Tensor:
        """Logits of every position, [B, T, V]."""
        return self.lm_head(self.hidden_states(tokens, cache, fb))


def _decode_layer(
    layer: DecoderLayer,
    x: Tensor,
    residual: Tensor,
    rope: tuple[Tensor, Tensor],
    cache_l: Tensor,
    fb: ForwardBatch,
    ops: _Ops,
) -> tuple[Tensor, Tensor]:
    return layer(x, residual, rope, cache_l, fb, ops)


def _decode_logits(model: CausalLM, x: Tensor, residual: Tensor) -> Tensor:
    norm = model.model.norm
    h, _ = add_rms_norm(x, residual, norm.weight, norm.eps)
    return model.lm_head(h[:, 0])


def _decode_head(model: CausalLM, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
    logits = _decode_logits(model, x, residual)
    return logits, logits.argmax(dim=-1)


_COMPILED: dict[tuple[str, bool, str], Callable[..., Any]] = {}


def _compiled(fn: Callable[..., Any], gemv_reductions: bool, backend: str) -> Callable[..., Any]:
    """One torch.compile wrapper per function and options, shared by every model: Dynamo keys its
    cache on the code, and guards on shapes and dtypes tell models apart."""
    key = (fn.__name__, gemv_reductions, backend)
    if key not in _COMPILED:
        options: dict[str, str | int | bool | Callable[..., Any]] | None = (
            {"coordinate_descent_tuning": gemv_reductions} if backend == "inductor" else None
        )
        # NOTE: dynamic=False turns automatic dynamic shapes off (a second model's hidden size must not
        # make the first one's kernels generic); the dimensions that do vary are marked dynamic.
        _COMPILED[key] = torch.compile(fn, dynamic=False, fullgraph=True, backend=backend, options=options)
    return _COMPILED[key]


def _rows_dynamic(*tensors: Tensor) -> None:
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)


class DecodeStep:
    """One token per row over slots 0..B-1 -> (logits [B, V], their argmax [B]), every decoder layer
    and the head through torch.compile (CUDA, meant to be captured in a CUDA graph).

    Inductor fuses the norms, bias, RoPE, the KV cache write and the attention's reshapes into a few
    kernels per layer. With `gemv_reductions`, one-row matmuls become Triton reductions tuned by
    coordinate descent (Inductor's decomposition of M = 1 matmuls, gpt-fast's setting); with more
    rows they stay cuBLAS GEMMs. `attention`: "auto" (the split-KV Triton kernels of
    `decode_attention` for one row, SDPA for more), "sdpa", "triton" or "reductions"
    (`attend_reductions`). `eager_argmax`: the argmax after the compiled head, in ATen.
    Compiles per model shape: one for 1 row, one for any other row count; the KV length is dynamic.
    `backend`: torch.compile's (tests trace on CPU with "aot_eager").
    """

    def __init__(
        self,
        model: CausalLM,
        gemv_reductions: bool = True,
        attention: str = "auto",
        backend: str = "inductor",
        eager_argmax: bool = True,
    ) -> None:
        if attention != "auto" and attention not in DECODE_ATTENTION_OPS:
            names = ", ".join(["auto", *DECODE_ATTENTION_OPS])
            raise ValueError(f"unknown decode attention {attention!r} ({names})")
        _raise_recompile_limits()
        # NOTE: "auto": the Triton kernels for one row (2.1 -> 1.5 ms per 1.5B-shape token on an H200),
        # SDPA for more rows (at 64 rows the Triton kernels, one program per query head, were slower)
        self.ops_one = DECODE_ATTENTION_OPS["triton" if attention == "auto" else attention]
        self.ops_many = DECODE_ATTENTION_OPS["sdpa" if attention == "auto" else attention]
        if isinstance(self.ops_one, _TritonAttentionOps):
            import deepseek_serve.engine.torch_runner.decode_attention  # noqa: F401  (registers the op)
        self.model = model
        self.eager_argmax = eager_argmax
        self._layer = _compiled(_decode_layer, gemv_reductions, backend)
        self._head = _compiled(_decode_head, gemv_reductions, backend)
        self._logits = _compiled(_decode_logits, gemv_reductions, backend)

    def __call__(self, tokens: Tensor, cache: KVCache, fb: ForwardBatch) -> tuple[Tensor, Tensor]:
        """tokens [B, 1]; `fb` over the slot range (slots None)."""
        m = self.model
        assert m.rope is not None and fb.slots is None and fb.rows is not None
        x = m.model.embed_tokens(tokens)
        cs = m.rope[fb.positions].to(x.dtype)  # [B, 1, 2, D]
        rope = (cs[:, :, 0:1], cs[:, :, 1:2])
        # NOTE: layer 0 adds a zero residual (exact), so that one compiled layer serves all of them
        residual = torch.zeros_like(x)
        torch._dynamo.maybe_mark_dynamic(fb.mask, 3)
        many = tokens.shape[0] > 1
        ops = self.ops_many if many else self.ops_one
        if isinstance(ops, _TritonAttentionOps):
            fb.lengths = fb.positions[:, 0] + 1
        if many:
            _rows_dynamic(rope[0], rope[1], fb.rows, fb.write_pos, fb.mask)
            if fb.lengths is not None:
                _rows_dynamic(fb.lengths)
        for layer, cache_l in zip(m.model.layers, cache.kv, strict=True):
            if many:
                _rows_dynamic(x, residual)
            x, residual = self._layer(layer, x, residual, rope, cache_l, fb, ops)
        if many:
            _rows_dynamic(x, residual)
        if self.eager_argmax:
            logits = self._logits(m, x, residual)
            return logits, logits.argmax(dim=-1)
        return self._head(m, x, residual)


def fuse_hf_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face names -> this module's: q/k/v_proj into qkv_proj, gate/up_proj into gate_up_proj."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if ".self_attn.q_proj." in key:
            stem, kind = key.split(".self_attn.q_proj.")
            parts = [state[f"{stem}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{stem}.self_attn.qkv_proj.{kind}"] = torch.cat(parts, dim=0)
        elif ".mlp.gate_proj." in key:
            stem, kind = key.split(".mlp.gate_proj.")
            out[f"{stem}.mlp.gate_up_proj.{kind}"] = torch.cat([value, state[f"{stem}.mlp.up_proj.{kind}"]], dim=0)
        elif not any(f".{p}." in key for p in ("k_proj", "v_proj", "up_proj")):
            out[key] = value
    return out
