"""Weight-only quantization as a module swap (gpt-fast habit): `quantize_model(model, mode)` replaces
every `nn.Linear` of the decoder layers with a quantized twin in place, and the LM head with an int8 one.

- int8: per-output-channel symmetric scales (see `Int8Linear` for the kernels).
- int4: group-wise asymmetric (min/max, 16 levels, groups along K). CUDA: aten's tinygemm
  `_weight_int4pack_mm` (bfloat16; the fastest for a few rows, slow for many) or the Triton kernel of
  `quant_kernels`; CPU: `_weight_int4pack_mm_for_cpu`.

CUDA kernels by rows M (the batch's tokens), measured on an H200 (docs/performance.md): one int8 row
goes through the split-K GEMV kernel of `gemv_kernels` (`Int8OneRow` "gemv": codes dequantized by
bit tricks, 1.342 ms per 1.5B-shape decode step vs 1.646 with "inductor", where Inductor's
coordinate-descent-tuned reductions fuse the RMSNorm and the int8 -> bf16 cast); "triton" is the Triton
matmul. One int4 row of the Triton layout goes through the GEMV kernel (`Int4OneRow` "gemv": 5.6-13.3
µs per 1.5B linear against 6.1-17.0 for the tile kernel's 16-row tile in another run, "kernel"). Up to TRITON_MAX_ROWS
the Triton weight-only matmuls (`quant_kernels`: weights read once, dequantized in registers, tile
configs per M bucket); above it (prefill) the weights are dequantized and cuBLAS multiplies. int4
defaults to the Triton kernels (INT4_KERNEL, the `pack_int4` layout for every row count); aten's
tinygemm (its own packing, fast for one row, slow for many) stays selectable per model. Benchmarks
pick other kernels through `quantize_model`'s arguments.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QuantMode = Literal["none", "int8", "int4"]
Int4Kernel = Literal["triton", "tinygemm"]
Int4OneRow = Literal["gemv", "kernel"]  # one int4 row (Triton layout): the GEMV kernel or the layout's kernel
Int8OneRow = Literal["gemv", "inductor", "triton"]  # the kernel of one int8 row
INT4_INNER_K_TILES = 8
GEMV_MAX_ROWS = 1
TRITON_MAX_ROWS = 128
INT8_ONE_ROW: Int8OneRow = "gemv"
INT4_KERNEL: Int4Kernel = "triton"  # CUDA default
INT4_ONE_ROW: Int4OneRow = "gemv"


def triton_kernels() -> bool:
    """Whether `quant_kernels` (Triton) is importable; importing it registers the custom ops."""
    try:
        importlib.import_module("deepseek_serve.engine.runners.pytorch.quant_kernels")
    except ImportError:
        return False
    return True


_GEMV: ModuleType | None = None  # `gemv_kernels`, once `gemv_kernels()` has imported it


def gemv_kernels() -> bool:
    """Whether `gemv_kernels` (Triton) is importable; importing it registers the custom ops."""
    global _GEMV
    try:
        _GEMV = importlib.import_module("deepseek_serve.engine.runners.pytorch.gemv_kernels")
    except ImportError:
        return False
    return True


def gemv() -> ModuleType:
    """The `gemv_kernels` module (imported here on first use outside a traced graph: `DecodeStep`
    loads it before it compiles)."""
    if _GEMV is None and not gemv_kernels():
        raise RuntimeError("the GEMV kernels need Triton")
    assert _GEMV is not None
    return _GEMV


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


def pack_int4(codes: Tensor, group_size: int) -> Tensor:
    """codes int [N, K] in 0..15 -> uint8 [N, K / 2], the layout of `quant_kernels.w4_mm`: byte j of
    each group holds code j (low nibble) and code j + group/2 (high nibble)."""
    n, k = codes.shape
    g = codes.reshape(n, k // group_size, 2, group_size // 2).to(torch.uint8)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(packed: Tensor, group_size: int) -> Tensor:
    """Inverse of `pack_int4`: int32 codes [N, K]."""
    n, half_k = packed.shape
    p = packed.reshape(n, half_k * 2 // group_size, 1, group_size // 2)
    return torch.cat([p & 0xF, p >> 4], dim=2).reshape(n, half_k * 2).to(torch.int32)


def dequantize_int4(codes: Tensor, sz: Tensor, group_size: int) -> Tensor:
    """Inverse of `quantize_int4`, float32 [N, K]."""
    n, k = codes.shape
    scales = sz[:, :, 0].t().unsqueeze(2)  # [N, K/g, 1]
    zeros = sz[:, :, 1].t().unsqueeze(2)
    g = (codes.reshape(n, k // group_size, group_size).float() - 8.0) * scales + zeros
    return g.reshape(n, k)


INT4_GROUP_SIZE = 32  # the block size of GGUF's Q4_0/Q4_1, so Q4 checkpoints requantize losslessly


def int4_group_size(k: int, preferred: int = INT4_GROUP_SIZE) -> int:
    """The largest group size <= preferred (of 128, 64, 32) that divides K."""
    for g in (128, 64, 32):
        if g <= preferred and k % g == 0:
            return g
    raise ValueError(f"in_features {k} is not a multiple of 32: int4 needs K % 32 == 0")


def _finish(partials: Tensor, dtype: torch.dtype) -> Tensor:
    """`gemv_kernels.gemv_finish` (that module needs Triton): [SPLIT, M, N] -> [M, N] in `dtype`."""
    return (partials[0] if partials.shape[0] == 1 else partials.sum(0)).to(dtype)


class Int8Linear(nn.Module):
    """Per-output-channel int8 weights, weight-only. CPU: aten's fused `_weight_int8pack_mm` with bf16
    activations (its float32 path is not vectorized); CUDA: see the module docstring. `gemv`: up to
    GEMV_MAX_ROWS rows through `gemv_kernels` (on CUDA with `one_row` "gemv"; tests set it on CPU,
    where the kernels run in Triton's interpreter)."""

    weight: Tensor
    scales: Tensor

    def __init__(self, linear: nn.Linear, one_row: Int8OneRow = INT8_ONE_ROW) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scales = quantize_int8(linear.weight.data)
        self._cpu = linear.weight.device.type == "cpu"
        self._one_row_inductor = one_row == "inductor"
        self._triton = not self._cpu and triton_kernels()
        self.gemv = one_row == "gemv" and not self._cpu and gemv_kernels()
        act_dtype = torch.bfloat16 if self._cpu else linear.weight.dtype
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales.to(act_dtype))
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        m = x2.shape[0]
        if m <= GEMV_MAX_ROWS and self.gemv:
            y = _finish(self.gemv_partials(x2), x.dtype)
        elif self._cpu:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight, self.scales).to(x.dtype)
        elif m == 1 and self._one_row_inductor and torch.compiler.is_compiling():
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scales
        elif m <= TRITON_MAX_ROWS and self._triton:
            y = torch.ops.deepseek_serve.w8_mm(x2, self.weight, self.scales)
        else:
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scales
        y = y.view(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def gemv_partials(self, x: Tensor, silu: bool = False) -> Tensor:
        """Partial sums [SPLIT, M, N] of the GEMV kernel, bias excluded (`gemv_kernels`: x [M, K],
        gate_up [M, 2K] with `silu`, or partial sums of either); needs `gemv`."""
        return gemv().gemv_int8(x, self.weight, self.scales, silu)


class Int4Linear(nn.Module):
    """Group-wise int4 weights. `kernel`: "triton" (`pack_int4` layout, `quant_kernels.w4_mm`; CUDA,
    or Triton's interpreter), "tinygemm" (aten's CUDA kernel, bfloat16 only), "cpu" (aten's CPU
    kernel); None = INT4_KERNEL on CUDA, "cpu" on CPU. `gemv`: up to GEMV_MAX_ROWS rows of the
    Triton layout through `gemv_kernels` (on CUDA with `one_row` "gemv"; tests set it on CPU)."""

    weight: Tensor
    scales_and_zeros: Tensor

    def __init__(
        self,
        linear: nn.Linear,
        group_size: int = 0,
        kernel: Int4Kernel | None = None,
        one_row: Int4OneRow = INT4_ONE_ROW,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size = int4_group_size(self.in_features, group_size or INT4_GROUP_SIZE)
        w = linear.weight.data
        self.dtype = w.dtype
        self.on_cuda = w.device.type == "cuda"
        self.kernel: str = kernel or (INT4_KERNEL if self.on_cuda else "cpu")
        if self.kernel == "tinygemm" and w.dtype != torch.bfloat16:
            self.kernel = "triton"  # tinygemm takes bfloat16 only
        if self.kernel == "triton" and not triton_kernels():
            if w.dtype != torch.bfloat16:
                raise ValueError("int4 on CUDA needs bfloat16 weights or Triton (DS_DTYPE=bfloat16 or auto)")
            self.kernel = "tinygemm"
        codes, sz = quantize_int4(w, self.group_size)
        if self.kernel == "triton":
            packed = pack_int4(codes, self.group_size)
        elif self.kernel == "tinygemm":
            packed_u8 = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)  # [N, K/2]
            packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8, INT4_INNER_K_TILES)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INT4_INNER_K_TILES)
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", sz.to(w.dtype))
        self.bias = linear.bias
        self.gemv = self.kernel == "triton" and one_row == "gemv" and self.on_cuda and gemv_kernels()

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        """The weights as [N, K] in `dtype` (Triton layout only)."""
        codes = unpack_int4(self.weight, self.group_size)
        return dequantize_int4(codes, self.scales_and_zeros.float(), self.group_size).to(dtype)

    def _one_row(self, x2: Tensor) -> Tensor:
        """x2 [1, K] -> [1, N] in the `pack_int4` layout: the split-K GEMV kernel (`gemv`), else the
        tile kernel with its smallest row tile."""
        if self.gemv:
            return _finish(self.gemv_partials(x2), x2.dtype)
        return torch.ops.deepseek_serve.w4_mm(x2, self.weight, self.scales_and_zeros, self.group_size)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        m = x2.shape[0]
        if self.kernel == "triton":
            if m <= GEMV_MAX_ROWS:
                y = self._one_row(x2)
            elif m <= TRITON_MAX_ROWS:
                y = torch.ops.deepseek_serve.w4_mm(x2, self.weight, self.scales_and_zeros, self.group_size)
            else:
                y = F.linear(x2, self.dequantized(x.dtype))
        elif self.kernel == "tinygemm":
            y = torch.ops.aten._weight_int4pack_mm(x2, self.weight, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.scales_and_zeros)
        y = y.view(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def gemv_partials(self, x: Tensor, silu: bool = False) -> Tensor:
        """Partial sums [SPLIT, M, N] of the GEMV kernel, bias excluded (see `Int8Linear.gemv_partials`);
        needs `gemv`."""
        sz = self.scales_and_zeros
        return gemv().gemv_int4(x, self.weight, sz, self.group_size, silu)


def _swap(
    parent: nn.Module,
    mode: QuantMode,
    group_size: int,
    kernel: Int4Kernel | None,
    one_row: Int8OneRow,
    int4_one_row: Int4OneRow,
) -> None:
    for name, child in parent.named_children():
        if isinstance(child, nn.Linear):
            if mode == "int8":
                q: nn.Module = Int8Linear(child, one_row)
            else:
                q = Int4Linear(child, group_size, kernel, int4_one_row)
            setattr(parent, name, q)
        else:
            _swap(child, mode, group_size, kernel, one_row, int4_one_row)


def quantize_model(
    model: nn.Module,
    mode: QuantMode,
    group_size: int = 0,
    int4_kernel: Int4Kernel | None = None,
    int8_one_row: Int8OneRow = INT8_ONE_ROW,
    int4_one_row: Int4OneRow = INT4_ONE_ROW,
) -> None:
    """Swap the linear layers of `model.model.layers` for quantized ones and the LM head for int8
    (under int4 too: a 4-bit head costs more accuracy than its bytes are worth).

    The embedding table and norms stay in the model dtype. For a tied LM head, the head quantizes a
    copy of the embedding (the embedding itself is read by row and stays unquantized).
    `group_size`: int4 group along K (0 = INT4_GROUP_SIZE); `int4_kernel`, `int8_one_row` and
    `int4_one_row`: the CUDA kernels (see `Int4Linear` and the module docstring).
    """
    if mode == "none":
        return
    if mode not in ("int8", "int4"):
        raise ValueError(f"unknown quantization {mode!r} (none, int8, int4)")
    _swap(model.model.layers, mode, group_size, int4_kernel, int8_one_row, int4_one_row)  # type: ignore[union-attr, arg-type]
    model.lm_head = Int8Linear(model.lm_head, int8_one_row)  # type: ignore[arg-type]


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
