"""Weight-only quantization as a module swap (gpt-fast habit): `quantize_model(model, mode)` replaces
every `nn.Linear` of the decoder layers (and the LM head for int8) with a quantized twin in place.

- int8: per-output-channel symmetric scales, weight-only (see `Int8Linear` for the kernels).
- int4: group-wise asymmetric (min/max, 16 levels, groups of 32 along K); aten's tinygemm kernels
  (`_weight_int4pack_mm` on CUDA, `_weight_int4pack_mm_for_cpu` on CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QuantMode = Literal["none", "int8", "int4"]
INT4_INNER_K_TILES = 8
SMALL_M = 4  # rows up to which CUDA int8 uses the fused dequantize-and-reduce kernel
_int8_small_m: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None


def _int8_mm_reduce(x: Tensor, w: Tensor, scales: Tensor) -> Tensor:
    """[M, K] x int8 [N, K] -> [M, N]: one reduction over K, int8 read once (fused when compiled)."""
    return ((x.float().unsqueeze(1) * w.float()).sum(-1) * scales.float()).to(x.dtype)


def use_compiled_int8() -> None:
    """Decode-sized CUDA int8 matmuls through a torch.compile'd dequantize-and-reduce kernel."""
    global _int8_small_m
    _int8_small_m = torch.compile(_int8_mm_reduce, dynamic=True, fullgraph=True)


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [N, K] float -> (int8 [N, K], scales [N] float32) with w ~= q * scale[:, None]."""
    w32 = w.float()
    scales = w32.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w32 / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (codes int32 [N, K] in 0..15, scales_and_zeros float32 [K/group, N, 2]).

    Dequantized value = (code - 8) * scale + zero, with zero = min + 8 * scale (tinygemm's convention).
    """
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(dim=2, keepdim=True), g.amax(dim=2, keepdim=True)
    scales = (hi - lo).clamp(min=1e-6) / 15.0  # [N, K/g, 1]
    codes = ((g - lo) / scales).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    zeros = lo + scales * 8.0
    sz = torch.cat([scales, zeros], dim=2).permute(1, 0, 2).contiguous()  # [K/g, N, 2]
    return codes, sz


def dequantize_int4(codes: Tensor, sz: Tensor, group_size: int) -> Tensor:
    """Inverse of `quantize_int4`, float32 [N, K]."""
    n, k = codes.shape
    scales = sz[:, :, 0].t().unsqueeze(2)  # [N, K/g, 1]
    zeros = sz[:, :, 1].t().unsqueeze(2)
    g = (codes.reshape(n, k // group_size, group_size).float() - 8.0) * scales + zeros
    return g.reshape(n, k)


INT4_GROUP_SIZE = 32  # NOTE: the block size of GGUF's Q4_0/Q4_1, so Q4 checkpoints requantize losslessly


def int4_group_size(k: int, preferred: int = INT4_GROUP_SIZE) -> int:
    """The largest group size <= preferred (of 128, 64, 32) that divides K."""
    for g in (128, 64, 32):
        if g <= preferred and k % g == 0:
            return g
    raise ValueError(f"in_features {k} is not a multiple of 32: int4 needs K % 32 == 0")


class Int8Linear(nn.Module):
    weight: Tensor
    scales: Tensor

    """Per-output-channel int8 weights, weight-only. CPU: aten's fused `_weight_int8pack_mm` with bf16
    activations (its float32 path is not vectorized); CUDA: a compiled dequantize-and-reduce kernel
    for decode-sized inputs, else dequantize then matmul."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scales = quantize_int8(linear.weight.data)
        self._cpu = linear.weight.device.type == "cpu"
        act_dtype = torch.bfloat16 if self._cpu else linear.weight.dtype
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales.to(act_dtype))
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        if self._cpu:
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales).to(x.dtype)
            y = y.view(*x.shape[:-1], self.out_features)
        elif _int8_small_m is not None and x.numel() // self.in_features <= SMALL_M:
            y = _int8_small_m(x.reshape(-1, self.in_features), self.weight, self.scales)
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales
        return y + self.bias if self.bias is not None else y


class Int4Linear(nn.Module):
    weight: Tensor
    scales_and_zeros: Tensor

    def __init__(self, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size = int4_group_size(self.in_features, group_size)
        w = linear.weight.data
        self.dtype = w.dtype
        self.on_cuda = w.device.type == "cuda"
        codes, sz = quantize_int4(w, self.group_size)
        if self.on_cuda:
            if w.dtype != torch.bfloat16:
                raise ValueError("int4 on CUDA needs bfloat16 weights (DS_DTYPE=bfloat16 or auto)")
            packed_u8 = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)  # [N, K/2]
            packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8, INT4_INNER_K_TILES)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INT4_INNER_K_TILES)
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", sz.to(w.dtype))
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.on_cuda:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.weight, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2, self.weight, self.group_size, self.scales_and_zeros
            )
        y = y.view(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


def _swap(parent: nn.Module, mode: QuantMode) -> None:
    for name, child in parent.named_children():
        if isinstance(child, nn.Linear):
            setattr(parent, name, Int8Linear(child) if mode == "int8" else Int4Linear(child))
        else:
            _swap(child, mode)


def quantize_model(model: nn.Module, mode: QuantMode) -> None:
    """Swap the linear layers of `model.model.layers` (and `lm_head` for int8) for quantized ones.

    The embedding table and norms stay in the model dtype. For a tied LM head, int8 quantizes a copy
    of the embedding (the embedding itself is read by row and stays unquantized).
    """
    if mode == "none":
        return
    if mode not in ("int8", "int4"):
        raise ValueError(f"unknown quantization {mode!r} (none, int8, int4)")
    _swap(model.model.layers, mode)  # type: ignore[union-attr, arg-type]
    if mode == "int8":
        model.lm_head = Int8Linear(model.lm_head)  # type: ignore[arg-type]


def weight_bytes(model: nn.Module, include_embedding: bool = False) -> int:
    """Bytes of weights read per decode step (the embedding table excluded: it is read by row)."""
    total = 0
    emb: Tensor = model.model.embed_tokens.weight  # type: ignore[union-attr, assignment]
    for t in list(model.parameters()) + list(model.buffers()):
        if t is emb and not include_embedding:
            continue
        total += t.numel() * t.element_size()
    if not include_embedding and model.lm_head.weight is emb:  # type: ignore[union-attr]
        total += emb.numel() * emb.element_size()
    return total
