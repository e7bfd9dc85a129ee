"""A compact Llama / Qwen2 decoder (gpt-fast style) that reads and writes a slot KV cache.

One module serves both architectures: Qwen2 differs only by a bias on q/k/v. Shapes use
B = batch rows, T = new tokens per row, H = query heads, Hk = KV heads, D = head dim, S = cache length.
Every forward takes the `Ops` it computes with (the eager functions unless the runner passes fused ones).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from deepseek_serve.engine.runners.pytorch.config import ModelArgs
from deepseek_serve.engine.runners.pytorch.forward_batch import ForwardBatch
from deepseek_serve.engine.runners.pytorch.ops import EAGER_OPS, Ops, attend_chunk, rms_norm, rope_cache
from deepseek_serve.engine.runners.pytorch.quantize import gemv


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


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
        self, x: Tensor, rope: tuple[Tensor, Tensor], cache_l: Tensor, fb: ForwardBatch, ops: Ops = EAGER_OPS
    ) -> Tensor:
        """`cache_l` [slots, Hk, S_max + 1, 2D] is this layer's part of `KVCache.kv`."""
        b, t, _ = x.shape
        h, hk, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = project(self.qkv_proj, x, ops).view(b, t, h + 2 * hk, hd)
        q, kv = ops.rope_pack(qkv, rope[0], rope[1], h, hk)  # [B, T, H, D], [B, T, Hk, 2D]
        cache_l[fb.rows, :, fb.write_pos] = kv
        if fb.blocks is not None:
            return project(self.o_proj, attend_chunk(q, cache_l, fb.blocks), ops)
        assert fb.mask is not None
        s = fb.mask.shape[-1]
        if fb.kv_concat:  # one packed row: its segments' slots side by side
            assert fb.slots is not None
            n = fb.slots.shape[0]
            kvs = cache_l[fb.slots, :, : s // n].transpose(0, 1).reshape(1, hk, s, 2 * hd)  # [1, Hk, S, 2D]
            return project(self.o_proj, ops.attend(q, kvs, fb, hk), ops)
        # decode over a slot range: row i is slot i (a view); else gather the rows' slots
        kvs = cache_l[:b, :, :s] if fb.slots is None else cache_l[fb.slots, :, :s]  # [B, Hk, S, 2D]
        return project(self.o_proj, ops.attend(q, kvs, fb, hk), ops)


class MLP(nn.Module):
    """gate and up projections fused into `gate_up_proj` (2 * intermediate outputs) at load time."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        d, i = args.hidden_size, args.intermediate_size
        self.gate_up_proj = nn.Linear(d, 2 * i, bias=args.mlp_bias)
        self.down_proj = nn.Linear(i, d, bias=args.mlp_bias)

    def forward(self, x: Tensor, ops: Ops = EAGER_OPS) -> Tensor:
        """x [B, T, d] -> [B, T, d]; with `ops.gemv_down`, partial sums [S, B, T, d] of it (the caller
        sums them: S <= 8, float32 or x's dtype), from the GEMV kernels for one row."""
        if ops.gemv_down:
            partials = mlp_partials(self, x.view(-1, x.shape[-1])) if x.numel() == x.shape[-1] else None
            if partials is not None:
                return partials.view(partials.shape[0], *x.shape)
            return self.down_proj(ops.silu_mul(self.gate_up_proj(x))).unsqueeze(0)
        return project(self.down_proj, ops.silu_mul(project(self.gate_up_proj, x, ops)), ops)


def project(linear: nn.Module, x: Tensor, ops: Ops) -> Tensor:
    """linear(x); with `ops.bias_apart` a plain linear's bias is added after the matmul, which Inductor
    then reduces for one row with the RMSNorm before it and the bias fused in (it sends a matmul with
    a bias, addmm, to cuBLAS whatever the rows)."""
    if ops.bias_apart and isinstance(linear, nn.Linear) and linear.bias is not None:
        return nn.functional.linear(x, linear.weight) + linear.bias
    return linear(x)


def _has_gemv(linear: nn.Module, dtype: torch.dtype) -> bool:
    """Whether `linear` has a GEMV kernel: a quantized linear with `gemv` on, or a plain one of `dtype`."""
    if isinstance(linear, nn.Linear):
        return linear.weight.dtype == dtype
    return bool(getattr(linear, "gemv", False))


def mlp_partials(mlp: MLP, x: Tensor) -> Tensor | None:
    """Partial sums [S, 1, d] of mlp(x) for one row x [1, d] through `gemv_kernels` (registered by
    importing it): the down projection computes SiLU·up from gate_up's output (or from its partial
    sums, for a quantized gate_up with a GEMV kernel; a plain gate_up is left to the caller's
    compiler, which fuses the RMSNorm into it). None where the down projection has no GEMV kernel."""
    gu, down = mlp.gate_up_proj, mlp.down_proj
    if not _has_gemv(down, x.dtype):
        return None
    if not isinstance(gu, nn.Linear) and _has_gemv(gu, x.dtype) and gu.bias is None:
        gate_up = gu.gemv_partials(x)  # [S, 1, 2I]
    else:
        gate_up = gu(x)  # [1, 2I]
    if isinstance(down, nn.Linear):
        partials = gemv().gemv_float(gate_up, down.weight, True)
    else:
        partials = down.gemv_partials(gate_up, silu=True)
    if down.bias is not None:
        return (partials.sum(0) + down.bias).unsqueeze(0)
    return partials


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
        ops: Ops = EAGER_OPS,
    ) -> tuple[Tensor, Tensor]:
        """(x, residual) -> (mlp output, residual before it); the caller adds the last pair. With
        `ops.gemv_down` the mlp output is partial sums [S, B, T, d] (see `MLP.forward`)."""
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

    def hidden_states(self, tokens: Tensor, cache: KVCache, fb: ForwardBatch, ops: Ops = EAGER_OPS) -> Tensor:
        """tokens [B, T] -> final-norm hidden states [B, T, d]."""
        assert self.rope is not None, "call setup_rope first"
        x = self.model.embed_tokens(tokens)
        cs = self.rope[fb.positions].to(x.dtype)  # [B, T, 2, D]
        rope = (cs[:, :, 0:1], cs[:, :, 1:2])  # cos, sin: [B, T, 1, D]
        residual: Tensor | None = None
        for layer, cache_l in zip(self.model.layers, cache.kv, strict=True):
            x, residual = layer(x, residual, rope, cache_l, fb, ops)
        assert residual is not None
        h, _ = ops.add_rms_norm(x, residual, self.model.norm.weight, self.model.norm.eps)
        return h

    def forward(self, tokens: Tensor, cache: KVCache, fb: ForwardBatch, ops: Ops = EAGER_OPS) -> Tensor:
        """Logits of every position, [B, T, V]."""
        return self.lm_head(self.hidden_states(tokens, cache, fb, ops))


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
