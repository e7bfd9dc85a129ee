"""Memory-bound GEMV kernels in Triton for one-row decode: y[M, N] = act(x)[M, K] @ W[N, K]^T for
M = 1 (correct for any M, meant for a few rows), without tensor cores.

Each program owns BLOCK_N outputs and one of SPLIT slices of K: it loads [BLOCK_N, BLOCK_K] weight
tiles (contiguous along K, so wide loads), multiplies them by the activation slice in float32 and
reduces along K at the end. The programs write partial sums [SPLIT, M, N] (float32; in the input's
dtype when SPLIT is 1) and the consumer sums them in a fixed order (deterministic, unlike atomics):
inside a compiled decode step Inductor unrolls a sum over at most MAX_SPLIT partials into its next
kernel (the RoPE, the residual add and RMSNorm), and a GEMV kernel takes partial sums [XS, M, K] as
its input and sums them on load (a quantized gate_up's partials into the down projection), so no
kernel is launched for the sums. `gemv_finish` sums where nothing fuses. Weights:

- "float": bf16 / fp16 / fp32 [N, K], the activation's dtype;
- "int8": int8 [N, K] with one scale per output channel (`quantize.quantize_int8`);
- "int4": codes packed two per byte in groups of G along K (`quantize.pack_int4`: byte j of a group
  holds code j in its low nibble and code j + G/2 in its high one), scales and zeros [K / G, N, 2]
  (value = (code - 8) * scale + zero). A group adds scale * dot(x, codes - 8) + zero * sum(x).

Codes become float32 in one of three ways (`GemvConfig.dequant`): CAST, int -> float conversions (the
conversion units give 16 results per clock per SM on sm_90, fewer than one int8 / int4 weight stream
of an H200 needs); BITS, bit tricks in plain Triton: the code (made non-negative) goes into the
mantissa of 2^23 by an integer add / OR, the result is reinterpreted as a float32 and 2^23 plus the
offset is subtracted (exact: every integer below 2^24 is a float32); PTX, the same in inline PTX over
4 packed bytes at a time (`prmt` byte moves for int8, `lop3` masks of 5 nibbles in place for int4, as
`quant_kernels`' bf16 `_int8_to_bf16` / `_int4_to_bf16` do for the tile kernels). All three give
exactly code (int8) or code - 8 (int4). PTX needs CUDA: elsewhere (Triton's CPU interpreter) it runs
as BITS.

`silu`: the activation is SiLU(gate) * up of a gate_up row [M, 2K] (the MLP's down projection reads
the gate_up output directly; each program computes only its K slice), rounded to the input dtype as
the unfused `silu_mul` would. Custom ops (`deepseek_serve::gemv_float` / `gemv_int8` / `gemv_int4`):
torch.compile keeps each opaque and CUDA graphs capture it. CUDA, or Triton's CPU interpreter in tests.
"""

# Triton kernel parameters are untyped pointers and scalars (Triton specializes on them).
# mypy: disable-error-code="no-untyped-def"
from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

Kind = Literal["float", "int8", "int4"]
KINDS: tuple[Kind, ...] = ("float", "int8", "int4")
MAX_SPLIT = 8  # Inductor unrolls a sum over at most 8 partials into its consumer (unroll_reductions_threshold)
CAST, BITS, PTX = 0, 1, 2  # code -> float32 conversions, see the module docstring
DEQUANT_NAMES = ("cast", "bits", "ptx")


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int  # elements of K per iteration (int4: a multiple of the group)
    split: int  # K slices; the partials' first dimension
    num_warps: int
    dequant: int = PTX  # CAST / BITS / PTX (quantized kinds)


@triton.jit
def _load_x(x_row, off, ok, stride_xs, XS: tl.constexpr):
    """float32 sum of the XS input slices at offsets `off` of one row."""
    v = tl.load(x_row + off, mask=ok, other=0.0).to(tl.float32)
    for s in tl.static_range(1, XS):
        v += tl.load(x_row + s * stride_xs + off, mask=ok, other=0.0).to(tl.float32)
    return v


@triton.jit
def _activation(x_row, rk, K, ok, stride_xs, XS: tl.constexpr, SILU: tl.constexpr):
    """The float32 activation at K positions `rk` of one row: x, or SiLU(gate) * up rounded to the
    input dtype (as an unfused `silu_mul` of a bf16 gate_up would be)."""
    if SILU:
        g = _load_x(x_row, rk, ok, stride_xs, XS)
        u = _load_x(x_row, K + rk, ok, stride_xs, XS)
        a = g * tl.sigmoid(g) * u
        return a.to(x_row.dtype.element_ty).to(tl.float32)
    return _load_x(x_row, rk, ok, stride_xs, XS)


@triton.jit
def _int8_to_f32_bits(w):
    """int8 -> float32, exact: (w + 128) added to the bits of 2^23, reinterpreted, 2^23 + 128 off."""
    return (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _int8_to_f32_ptx(w):
    """int8 -> float32, exact, 4 bytes at a time: the bytes XOR 0x80 (w + 128) moved by `prmt` into the
    low byte of 2^23's bits, then 2^23 + 128 subtracted."""
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 u;
        xor.b32 u, $4, 0x80808080;
        prmt.b32 $0, u, 0x4B000000, 0x7440;
        prmt.b32 $1, u, 0x4B000000, 0x7441;
        prmt.b32 $2, u, 0x4B000000, 0x7442;
        prmt.b32 $3, u, 0x4B000000, 0x7443;
        sub.f32 $0, $0, 0f4B000080;
        sub.f32 $1, $1, 0f4B000080;
        sub.f32 $2, $2, 0f4B000080;
        sub.f32 $3, $3, 0f4B000080;
        }
        """,
        constraints="=r,=r,=r,=r,r",
        args=[w],
        dtype=tl.int32,
        is_pure=True,
        pack=4,
    ).to(tl.float32, bitcast=True)


@triton.jit
def _int4_to_f32_bits(b):
    """Packed bytes -> (low nibbles - 8, high nibbles - 8) as float32, exact: each nibble ORed into
    the bits of 2^23, reinterpreted, 2^23 + 8 subtracted."""
    bi = b.to(tl.int32)
    lo = ((bi & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    hi = ((bi >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    return lo, hi


@triton.jit
def _int4_to_f32_ptx(b):
    """`_int4_to_f32_bits` 4 bytes (8 nibbles) at a time: a nibble at bit p (p <= 16) of the word, or
    of the word >> 12, masked in place by one `lop3` into the bits of 2^23 (2^23 + code * 2^p), then
    one FMA: * 2^-p - (2^(23 - p) + 8) (exact: power-of-two scaling, an integer result)."""
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 v;
        shr.b32 v, $8, 12;
        lop3.b32 $0, $8, 0x0000000F, 0x4B000000, 0xEA;
        lop3.b32 $4, $8, 0x000000F0, 0x4B000000, 0xEA;
        lop3.b32 $1, $8, 0x00000F00, 0x4B000000, 0xEA;
        lop3.b32 $5, $8, 0x0000F000, 0x4B000000, 0xEA;
        lop3.b32 $2, $8, 0x000F0000, 0x4B000000, 0xEA;
        lop3.b32 $6, v, 0x00000F00, 0x4B000000, 0xEA;
        lop3.b32 $3, v, 0x0000F000, 0x4B000000, 0xEA;
        lop3.b32 $7, v, 0x000F0000, 0x4B000000, 0xEA;
        fma.rn.f32 $0, $0, 0f3F800000, 0fCB000008;
        fma.rn.f32 $4, $4, 0f3D800000, 0fC9000080;
        fma.rn.f32 $1, $1, 0f3B800000, 0fC7000800;
        fma.rn.f32 $5, $5, 0f39800000, 0fC5008000;
        fma.rn.f32 $2, $2, 0f37800000, 0fC3080000;
        fma.rn.f32 $6, $6, 0f3B800000, 0fC7000800;
        fma.rn.f32 $3, $3, 0f39800000, 0fC5008000;
        fma.rn.f32 $7, $7, 0f37800000, 0fC3080000;
        }
        """,
        constraints="=r,=r,=r,=r,=r,=r,=r,=r,r",
        args=[b],
        dtype=(tl.int32, tl.int32),
        is_pure=True,
        pack=4,
    )


@triton.jit
def _int8_to_f32(w, DEQUANT: tl.constexpr):
    if DEQUANT == 2:
        return _int8_to_f32_ptx(w)
    elif DEQUANT == 1:
        return _int8_to_f32_bits(w)
    else:
        return w.to(tl.float32)


@triton.jit
def _int4_to_f32(b, DEQUANT: tl.constexpr):
    """Packed bytes -> (low nibbles - 8, high nibbles - 8), float32."""
    if DEQUANT == 2:
        lo, hi = _int4_to_f32_ptx(b)
        return lo.to(tl.float32, bitcast=True), hi.to(tl.float32, bitcast=True)
    elif DEQUANT == 1:
        return _int4_to_f32_bits(b)
    else:
        return ((b & 0xF).to(tl.int32) - 8).to(tl.float32), ((b >> 4).to(tl.int32) - 8).to(tl.float32)


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    part_ptr,
    M,
    N,
    K,
    stride_xs,
    stride_xm,
    stride_wn,
    K_PER_SPLIT,
    XS: tl.constexpr,  # input slices summed on load (partial sums of the layer before)
    KIND: tl.constexpr,  # 0 float, 1 int8, 2 int4
    SILU: tl.constexpr,
    GROUP: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    DEQUANT: tl.constexpr,  # CAST / BITS / PTX
):
    HALF: tl.constexpr = GROUP // 2
    NG: tl.constexpr = BK // GROUP
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn < N
    w_rows = w_ptr + rn.to(tl.int64) * stride_wn  # [BN] (an LM head may pass 2^31 elements)
    k_start = pid_k * K_PER_SPLIT
    x_row = x_ptr + m * stride_xm
    if KIND == 2:
        rt = tl.arange(0, NG)
        rj = tl.arange(0, HALF)
        acc4 = tl.zeros((BN, NG), dtype=tl.float32)
        for kk in range(0, K_PER_SPLIT, BK):
            g = (k_start + kk) // GROUP + rt  # [NG] groups of this tile
            g_ok = g < K // GROUP
            xk = g[:, None] * GROUP + rj[None, :]  # [NG, HALF]
            x_lo = _activation(x_row, xk, K, g_ok[:, None], stride_xs, XS, SILU)
            x_hi = _activation(x_row, xk + HALF, K, g_ok[:, None], stride_xs, XS, SILU)
            wp = w_rows[:, None, None] + g[None, :, None] * HALF + rj[None, None, :]
            b = tl.load(wp, mask=n_ok[:, None, None] & g_ok[None, :, None], other=0)  # [BN, NG, HALF] uint8
            lo, hi = _int4_to_f32(b, DEQUANT)  # codes - 8
            dot = tl.sum(lo * x_lo[None, :, :] + hi * x_hi[None, :, :], axis=2)  # [BN, NG]
            x_sum = tl.sum(x_lo + x_hi, axis=1)  # [NG]
            sp = s_ptr + g[None, :] * (N * 2) + rn[:, None] * 2
            sz_ok = n_ok[:, None] & g_ok[None, :]
            scale = tl.load(sp, mask=sz_ok, other=0.0).to(tl.float32)
            zero = tl.load(sp + 1, mask=sz_ok, other=0.0).to(tl.float32)
            acc4 += dot * scale + x_sum[None, :] * zero
        out = tl.sum(acc4, axis=1)
    else:
        rk0 = tl.arange(0, BK)
        acc = tl.zeros((BN, BK), dtype=tl.float32)
        for kk in range(0, K_PER_SPLIT, BK):
            rk = k_start + kk + rk0
            k_ok = rk < K
            xv = _activation(x_row, rk, K, k_ok, stride_xs, XS, SILU)  # [BK]
            w = tl.load(w_rows[:, None] + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
            if KIND == 1:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
                wf = _int8_to_f32(w, DEQUANT)
            else:
                wf = w.to(tl.float32)
            acc += wf * xv[None, :]
        out = tl.sum(acc, axis=1)
        if KIND == 1:
            out = out * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(part_ptr + (pid_k * M + m) * N + rn, out.to(part_ptr.dtype.element_ty), mask=n_ok)


def default_config(kind: Kind, n: int, k: int, group: int = 0) -> GemvConfig:
    """The tile and split of a (kind, N, K) by shape class: the fastest of a grid of 6-7 tiles x splits
    1/2/4/8 per kind for the 1.5B linears, at one row on an H200, the quantized kinds with PTX bit-trick
    dequantization (bench/gpu_gemv.py, bench/results/gpu-h200-gemv-fast.json, µs per call):

    - long K (the down projection, K 8,960 -> N 1,536): float (32, 256, 8 splits, 4 warps) 11.8
      ((32, 512, 8, 8): 14.6), int8 (16, 256, 8, 4) 8.3, int4 g32 (32, 1024, 8, 8) 10.2;
    - the LM head (N 151,936): float (64, 256, 1, 4) 111.2, int8 (16, 256, 1, 4) 66.6, int4 g32
      (16, 512, 1, 4) 73.8;
    - wide (N >= 8,192: gate_up, K 1,536 -> N 17,920): float (128, 128, 8, 8) 19.1, int8 (16, 256, 4,
      4) 12.4, int4 g32 (16, 512, 1, 4) 12.7;
    - the rest (K 1,536 -> N 1,536 / 2,048: qkv, o): float (128, 128, 8, 8) 4.5-4.8, int8 (16, 256, 4,
      4) 3.6-3.8, int4 g32 (128, 256, 4, 8) 5.5.

    At most MAX_SPLIT splits and none emptier than one BLOCK_K; int4 tiles hold whole groups."""
    if k >= 4096:
        block_n, block_k, split, warps = {"float": (32, 256, 8, 4), "int8": (16, 256, 8, 4)}.get(kind, (32, 1024, 8, 8))
    elif n >= 65536:
        block_n, block_k, split, warps = {"float": (64, 256, 1, 4), "int8": (16, 256, 1, 4)}.get(kind, (16, 512, 1, 4))
    elif n >= 8192:
        block_n, block_k, split, warps = {"float": (128, 128, 8, 8), "int8": (16, 256, 4, 4)}.get(kind, (16, 512, 1, 4))
    else:
        block_n, block_k, split, warps = {"float": (128, 128, 8, 8), "int8": (16, 256, 4, 4)}.get(
            kind, (128, 256, 4, 8)
        )
    if kind == "int4":
        block_k = max(block_k, group)
    return GemvConfig(block_n, block_k, max(1, min(split, MAX_SPLIT, triton.cdiv(k, block_k))), warps)


# (kind, N, K, group) -> config: benchmarks try other configs here; `default_config` otherwise
OVERRIDES: dict[tuple[str, int, int, int], GemvConfig] = {}


def config_for(kind: Kind, n: int, k: int, group: int = 0) -> GemvConfig:
    return OVERRIDES.get((kind, n, k, group)) or default_config(kind, n, k, group)


def _k_per_split(k: int, cfg: GemvConfig) -> tuple[int, int]:
    """(K per split, a multiple of BLOCK_K; the number of non-empty splits)."""
    per = triton.cdiv(triton.cdiv(k, cfg.split), cfg.block_k) * cfg.block_k
    return per, triton.cdiv(k, per)


def _slices(x: Tensor, k: int, silu: bool, name: str) -> Tensor:
    """x [M, Kx] or [XS, M, Kx] (partial sums) -> [XS, M, Kx]; Kx = 2K with `silu`."""
    x3 = x.unsqueeze(0) if x.dim() == 2 else x
    if x3.dim() != 3 or x3.shape[2] != (2 * k if silu else k) or x3.stride(2) != 1 or x3.shape[0] > MAX_SPLIT:
        raise ValueError(f"{name}: x {tuple(x.shape)} for K {k} (silu {silu})")
    return x3


def num_splits(kind: Kind, n: int, k: int, group: int = 0) -> int:
    """How many partial sums a (kind, N, K, group) GEMV returns: its config's non-empty K splits."""
    return _k_per_split(k, config_for(kind, n, k, group))[1]


def _partials(x3: Tensor, n: int, split: int) -> Tensor:
    """The output buffer [SPLIT, M, N]: x's dtype for one split (no sum left to do), else float32."""
    dtype = x3.dtype if split == 1 else torch.float32
    return torch.empty((split, x3.shape[1], n), dtype=dtype, device=x3.device)


def _launch(
    kind: Kind, x: Tensor, w: Tensor, s: Tensor | None, n: int, k: int, silu: bool, group: int, split: int
) -> Tensor:
    x3 = _slices(x, k, silu, f"gemv_{kind}")
    cfg = config_for(kind, n, k, group)
    per, splits = _k_per_split(k, cfg)
    if splits != split:
        raise ValueError(f"gemv_{kind}: called for {split} partial sums, its config ({cfg}) gives {splits}")
    part = _partials(x3, n, split)
    m = x3.shape[1]
    if m == 0:
        return part
    grid = (triton.cdiv(n, cfg.block_n), split, m)
    dequant = cfg.dequant
    if dequant == PTX and (not x.is_cuda or _bytes_per_thread(kind, cfg, group) < 4):
        dequant = BITS  # inline PTX: CUDA only, whole 4-byte packs per thread
    _gemv_kernel[grid](
        x3,
        w,
        w if s is None else s,
        part,
        m,
        n,
        k,
        x3.stride(0),
        x3.stride(1),
        w.stride(0),
        per,
        XS=x3.shape[0],
        KIND=KINDS.index(kind),
        SILU=silu,
        GROUP=max(group, 2),
        BN=cfg.block_n,
        BK=cfg.block_k,
        DEQUANT=dequant if kind != "float" else CAST,
        num_warps=cfg.num_warps,
    )
    return part


def _bytes_per_thread(kind: Kind, cfg: GemvConfig, group: int) -> int:
    """Weight bytes of one tile per thread (int4: BLOCK_K / 2 per row)."""
    per_row = cfg.block_k // 2 if kind == "int4" else cfg.block_k
    return cfg.block_n * per_row // (32 * cfg.num_warps)


def _fake(x: Tensor, n: int, k: int, silu: bool, split: int, kind: Kind) -> Tensor:
    return _partials(_slices(x, k, silu, f"gemv_{kind}"), n, split)


# x below: [M, K] (or a gate_up [M, 2K] with `silu`), or [XS, M, ...] partial sums of the layer before
# (XS <= MAX_SPLIT). Output: partials [SPLIT, M, N], float32, or x's dtype when SPLIT is 1. `split` is
# `num_splits` of the op's shape, passed by the wrappers below: an argument, it is a constant of every
# traced graph, so a compiled graph cached on disk (Inductor's FX graph cache) never outlives a change
# of the configs that would change its output shape.


@torch.library.custom_op("deepseek_serve::gemv_float", mutates_args=())
def _gemv_float(x: Tensor, w: Tensor, silu: bool, split: int) -> Tensor:
    if w.stride(1) != 1:
        raise ValueError("gemv_float: w must be contiguous along K")
    return _launch("float", x, w, None, w.shape[0], w.shape[1], silu, 0, split)


@_gemv_float.register_fake
def _(x: Tensor, w: Tensor, silu: bool, split: int) -> Tensor:
    return _fake(x, w.shape[0], w.shape[1], silu, split, "float")


@torch.library.custom_op("deepseek_serve::gemv_int8", mutates_args=())
def _gemv_int8(x: Tensor, w: Tensor, scales: Tensor, silu: bool, split: int) -> Tensor:
    n, k = w.shape
    if w.stride(1) != 1 or scales.shape != (n,):
        raise ValueError(f"gemv_int8: w {tuple(w.shape)} / scales {tuple(scales.shape)}")
    return _launch("int8", x, w, scales.contiguous(), n, k, silu, 0, split)


@_gemv_int8.register_fake
def _(x: Tensor, w: Tensor, scales: Tensor, silu: bool, split: int) -> Tensor:
    return _fake(x, w.shape[0], w.shape[1], silu, split, "int8")


@torch.library.custom_op("deepseek_serve::gemv_int4", mutates_args=())
def _gemv_int4(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, group_size: int, silu: bool, split: int) -> Tensor:
    n, k = packed.shape[0], packed.shape[1] * 2
    if k % group_size or packed.stride(1) != 1 or scales_and_zeros.shape != (k // group_size, n, 2):
        raise ValueError(f"gemv_int4: packed {tuple(packed.shape)} / group {group_size}")
    return _launch("int4", x, packed, scales_and_zeros.contiguous(), n, k, silu, group_size, split)


@_gemv_int4.register_fake
def _(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, group_size: int, silu: bool, split: int) -> Tensor:
    return _fake(x, packed.shape[0], packed.shape[1] * 2, silu, split, "int4")


def gemv_float(x: Tensor, w: Tensor, silu: bool = False) -> Tensor:
    """Partials of x @ w.T; w [N, K] in x's dtype."""
    return torch.ops.deepseek_serve.gemv_float(x, w, silu, num_splits("float", w.shape[0], w.shape[1]))


def gemv_int8(x: Tensor, w: Tensor, scales: Tensor, silu: bool = False) -> Tensor:
    """Partials of x @ (w * scales[:, None]).T; w [N, K] int8, scales [N]."""
    return torch.ops.deepseek_serve.gemv_int8(x, w, scales, silu, num_splits("int8", w.shape[0], w.shape[1]))


def gemv_int4(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, group_size: int, silu: bool = False) -> Tensor:
    """Partials of x through group-wise int4 weights: packed [N, K / 2] uint8 (`pack_int4`),
    scales_and_zeros [K / G, N, 2]."""
    split = num_splits("int4", packed.shape[0], packed.shape[1] * 2, group_size)
    return torch.ops.deepseek_serve.gemv_int4(x, packed, scales_and_zeros, group_size, silu, split)


def gemv_finish(partials: Tensor, dtype: torch.dtype) -> Tensor:
    """partials [SPLIT, M, N] -> [M, N] in `dtype` (traced by torch.compile into the consumer; one
    split is a view)."""
    return (partials[0] if partials.shape[0] == 1 else partials.sum(0)).to(dtype)


def linear(x: Tensor, w: Tensor, silu: bool = False) -> Tensor:
    """`F.linear(x, w)` (or of SiLU(gate) * up with `silu`) for x [M, K or 2K] through `gemv_float`."""
    return gemv_finish(gemv_float(x, w, silu), x.dtype)
