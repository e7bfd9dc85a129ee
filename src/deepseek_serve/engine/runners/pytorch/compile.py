"""Everything torch.compile'd in the torch runner (CUDA): the fused elementwise ops of every forward,
and `DecodeStep`, the whole decode forward compiled for capture in CUDA graphs. A `Compiler` holds
the wrappers; the runner owns one and hands its products to the forward passes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from deepseek_serve.engine.runners.pytorch.forward_batch import ForwardBatch
from deepseek_serve.engine.runners.pytorch.modules import MLP, CausalLM, DecoderLayer, KVCache
from deepseek_serve.engine.runners.pytorch.ops import (
    DECODE_ATTENTIONS,
    Ops,
    add_rms_norm,
    decode_attention_ops,
    register_decode_attention,
    rms_norm,
    rope_pack,
    silu_mul,
)
from deepseek_serve.engine.runners.pytorch.quantize import gemv_kernels

# one-row MLPs through `gemv_kernels` (SiLU·up inside the down projection's split-K GEMV) where the down
# projections are quantized; bf16 ones stay Inductor's fused SiLU·down reduction, which measured faster
# in the whole step (1.519 vs 1.617 ms per 1.5B-shape step on an H200, docs/performance.md)
GEMV_DOWN = True


def raise_recompile_limits() -> None:
    """Sizes 0/1 are specialized (decode vs prefill, one row vs many) and each model shape compiles
    its own code: a handful of compiles per function, more than Dynamo's default limits allow."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)


def _decode_layer(
    layer: DecoderLayer,
    x: Tensor,
    residual: Tensor,
    rope: tuple[Tensor, Tensor],
    cache_l: Tensor,
    fb: ForwardBatch,
    ops: Ops,
) -> tuple[Tensor, Tensor]:
    return layer(_summed(x, residual.dtype), residual, rope, cache_l, fb, ops)


def _summed(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x [B, 1, d], or the MLP's partial sums [S, B, 1, d] (`Ops.gemv_down`): summed here, inside the
    compiled function, so that Inductor fuses the sum into the residual add and RMSNorm."""
    return x.sum(0).to(dtype) if x.dim() == 4 else x


def _decode_logits(model: CausalLM, x: Tensor, residual: Tensor) -> Tensor:
    x = _summed(x, residual.dtype)
    norm = model.model.norm
    h, _ = add_rms_norm(x, residual, norm.weight, norm.eps)
    return model.lm_head(h[:, 0])


def _decode_head(model: CausalLM, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
    logits = _decode_logits(model, x, residual)
    return logits, logits.argmax(dim=-1)


def _rows_dynamic(*tensors: Tensor) -> None:
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)


class Compiler:
    """torch.compile wrappers, each made once per function and options and shared by every decode
    step built with this compiler: Dynamo keys its cache on the code, and guards on shapes and dtypes
    tell models apart."""

    def __init__(self) -> None:
        self._wrappers: dict[tuple[str, bool, str], Callable[..., Any]] = {}

    def fused_ops(self) -> Ops:
        """The ops with the elementwise functions fused by torch.compile (dynamic shapes: one compile
        serves every batch). CUDA only; numerics are those of the eager ops up to rounding order."""
        raise_recompile_limits()

        def fuse(fn: Callable[..., Any]) -> Any:
            return torch.compile(fn, dynamic=True, fullgraph=True)

        return Ops(fuse(rms_norm), fuse(add_rms_norm), fuse(silu_mul), fuse(rope_pack))

    def decode_function(self, fn: Callable[..., Any], gemv_reductions: bool, backend: str) -> Callable[..., Any]:
        """`fn` compiled for the decode step (static shapes except the dimensions marked dynamic)."""
        key = (fn.__name__, gemv_reductions, backend)
        if key not in self._wrappers:
            options: dict[str, str | int | bool | Callable[..., Any]] | None = (
                {"coordinate_descent_tuning": gemv_reductions} if backend == "inductor" else None
            )
            # dynamic=False turns automatic dynamic shapes off (a second model's hidden size must not
            # make the first one's kernels generic); the dimensions that do vary are marked dynamic
            self._wrappers[key] = torch.compile(fn, dynamic=False, fullgraph=True, backend=backend, options=options)
        return self._wrappers[key]


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
    `backend`: torch.compile's (tests trace on CPU with "aot_eager"). `compiler`: the one whose
    wrappers to use (a new one when None). `gemv_down`: the one-row step's MLPs run SiLU·up and the
    down projection as one split-K GEMV kernel (`gemv_kernels`; None = GEMV_DOWN on CUDA for a model
    with quantized down projections). `bias_apart`: the one-row step adds the linears' biases after
    their matmuls (`Ops.bias_apart`). Inductor's M = 1 decomposition skips a matmul with a bias
    (addmm), so a Qwen2 one-row step runs its qkv projection as a cuBLAS GEMV after a separate RMSNorm
    kernel (5.3 + 2.3 µs per layer of the 1.5B shape on an H200); apart, the two could become one
    reduction like gate_up's. Off by default: not yet measured on a GPU (`bench/gpu_gemv.py
    --variants bf16,bf16-bias-apart`).
    """

    def __init__(
        self,
        model: CausalLM,
        gemv_reductions: bool = True,
        attention: str = "auto",
        backend: str = "inductor",
        eager_argmax: bool = True,
        compiler: Compiler | None = None,
        gemv_down: bool | None = None,
        bias_apart: bool = False,
    ) -> None:
        if attention != "auto" and attention not in DECODE_ATTENTIONS:
            names = ", ".join(["auto", *DECODE_ATTENTIONS])
            raise ValueError(f"unknown decode attention {attention!r} ({names})")
        raise_recompile_limits()
        # "auto": the Triton kernels for one row (2.1 -> 1.5 ms per 1.5B-shape token on an H200), SDPA
        # for more rows (at 64 rows the Triton kernels, one program per query head, were slower)
        self.ops_one = decode_attention_ops("triton" if attention == "auto" else attention)
        self.ops_many = decode_attention_ops("sdpa" if attention == "auto" else attention)
        if self.ops_one.attention == "triton":
            register_decode_attention()
        if gemv_down is None:
            gemv_down = (
                GEMV_DOWN
                and next(model.parameters()).device.type == "cuda"
                and any(isinstance(m, MLP) and not isinstance(m.down_proj, nn.Linear) for m in model.modules())
            )
        if gemv_down:
            if not gemv_kernels():  # imports them (registers the ops)
                raise RuntimeError("gemv_down needs the gemv_kernels module (Triton)")
            self.ops_one = replace(self.ops_one, gemv_down=True)
        if bias_apart:
            self.ops_one = replace(self.ops_one, bias_apart=True)
        self.model = model
        self.eager_argmax = eager_argmax
        compiler = compiler or Compiler()
        self._layer = compiler.decode_function(_decode_layer, gemv_reductions, backend)
        self._head = compiler.decode_function(_decode_head, gemv_reductions, backend)
        self._logits = compiler.decode_function(_decode_logits, gemv_reductions, backend)

    def __call__(self, tokens: Tensor, cache: KVCache, fb: ForwardBatch) -> tuple[Tensor, Tensor]:
        """tokens [B, 1]; `fb` over the slot range (slots None)."""
        m = self.model
        assert m.rope is not None and fb.slots is None and fb.rows is not None and fb.mask is not None
        x = m.model.embed_tokens(tokens)
        cs = m.rope[fb.positions].to(x.dtype)  # [B, 1, 2, D]
        rope = (cs[:, :, 0:1], cs[:, :, 1:2])
        # layer 0 adds a zero residual (exact), so that one compiled layer serves all of them
        residual = torch.zeros_like(x)
        torch._dynamo.maybe_mark_dynamic(fb.mask, 3)
        many = tokens.shape[0] > 1
        ops = self.ops_many if many else self.ops_one
        if ops.gemv_down:
            x = x.unsqueeze(0)  # the layers pass on the MLP's partial sums [S, B, 1, d]
        if ops.attention == "triton":
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
