"""Checks of the one-row GEMV kernels (`gemv_kernels`), run as a script by test_gemv_kernels.py and on
a GPU by hand.

A separate process because Triton's CPU interpreter (TRITON_INTERPRET=1, for machines without a
GPU) must be switched on before `triton` is first imported, and torch may import it early.
Usage: python gemv_kernels_check.py [checkpoint dir of a tiny model]
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepseek_serve.engine.runners.pytorch import gemv_kernels
from deepseek_serve.engine.runners.pytorch.compile import DecodeStep
from deepseek_serve.engine.runners.pytorch.forward_batch import ForwardBatch, additive_mask
from deepseek_serve.engine.runners.pytorch.gemv_kernels import GemvConfig
from deepseek_serve.engine.runners.pytorch.loading import load_model
from deepseek_serve.engine.runners.pytorch.modules import CausalLM, KVCache
from deepseek_serve.engine.runners.pytorch.quantize import (
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantize_model,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# relative error limits: float32 sums in another order; bf16 inputs round the SiLU·up activation
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]
# (M, N, K): N and K past the block (tails), a few rows
SHAPES = [(1, 70, 320), (1, 33, 96), (2, 130, 256), (3, 16, 64)]
# None = the default config; the others force splits (one split past K's end) and tiles
CONFIGS = [None, GemvConfig(16, 32, 1, 4), GemvConfig(32, 64, 3, 2), GemvConfig(64, 32, 8, 4)]


def rel_err(out: Tensor, ref: Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def activation(x: Tensor, silu: bool) -> Tensor:
    """The kernels' input: x, or SiLU(gate) * up rounded to x's dtype (what `silu_mul` gives)."""
    if not silu:
        return x.double()
    gate, up = x.double().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype).double()


def run(kind: str, x: Tensor, w: Tensor, s: Tensor | None, silu: bool, group: int, cfg: GemvConfig | None) -> Tensor:
    n, k = w.shape[0], (w.shape[1] * 2 if kind == "int4" else w.shape[1])
    key = (kind, n, k, group)
    if cfg is not None:
        gemv_kernels.OVERRIDES[key] = cfg
    try:
        if kind == "float":
            part = gemv_kernels.gemv_float(x, w, silu)
        elif kind == "int8":
            assert s is not None
            part = gemv_kernels.gemv_int8(x, w, s, silu)
        else:
            assert s is not None
            part = gemv_kernels.gemv_int4(x, w, s, group, silu)
    finally:
        gemv_kernels.OVERRIDES.pop(key, None)
    _, split = gemv_kernels._k_per_split(k, cfg or gemv_kernels.config_for(kind, n, k, group))
    assert part.shape == (split, x.shape[-2], n), part.shape
    assert part.dtype == (x.dtype if part.shape[0] == 1 else torch.float32), part.dtype
    return gemv_kernels.gemv_finish(part, torch.float64)


def check_kernels() -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    turn = itertools.cycle(range(len(CONFIGS)))
    for dtype, tol in DTYPES:
        for (m, n, k), xs in zip(SHAPES, (1, 3, 1, 2), strict=True):
            for silu in (False, True):
                # a row-strided view of x: the kernels take x's row stride
                x = torch.randn(m + 1, 2 * k if silu else k, device=DEVICE, generator=gen).to(dtype)[1:]
                a = activation(x, silu)
                if xs > 1:  # x as float32 partial sums [XS, M, Kx] of the layer before
                    x = torch.randn(xs, *x.shape, device=DEVICE, generator=gen)
                    a = activation(x.sum(0), silu)
                w = torch.randn(n, k, device=DEVICE, generator=gen) * 0.1
                q, scales = quantize_int8(w)
                cases: list[tuple[str, Tensor, Tensor | None, int, Tensor]] = [
                    ("float", w.to(dtype), None, 0, w.to(dtype).double()),
                    ("int8", q, scales.to(dtype), 0, q.double() * scales.to(dtype).double()[:, None]),
                ]
                for group in (32, 64):
                    if k % group == 0:
                        codes, sz = quantize_int4(w, group)
                        sz = sz.to(dtype)
                        deq = dequantize_int4(codes, sz.float(), group).double()
                        cases.append(("int4", pack_int4(codes, group), sz, group, deq))
                for kind, wk, s, group, w_ref in cases:
                    cfg = CONFIGS[next(turn)]  # each case one config, in turn
                    if cfg is not None and kind == "int4" and cfg.block_k % group:
                        cfg = cfg._replace(block_k=group)
                    out = run(kind, x, wk, s, silu, group, cfg)
                    err = rel_err(out, a @ w_ref.t())
                    assert err < tol, (kind, dtype, m, n, k, silu, group, cfg, err)
    print("gemv kernels ok")


def check_dequant_exact() -> None:
    """Each code -> float32 conversion (CAST, BITS, PTX; PTX runs as BITS off CUDA) gives exactly the
    reference's (code - zero) * scale: integer activations, power-of-two scales and integer zeros make
    every product and sum exact in float32, so outputs must equal float64 math bit for bit (int4 scales
    and zeros in float32 and in bf16). Weights
    include the extremes (int8 rows of -128 and 127, int4 rows of codes 0 and 15), N and K tails, one
    split past K's end and tiles of 2 and 16 bytes per thread."""
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    ptx = DEVICE.type == "cuda"
    # (M, N, K, group, config)
    cases = [
        (1, 37, 200, 0, GemvConfig(16, 64, 3, 4)),
        (2, 70, 328, 0, GemvConfig(32, 128, 2, 2)),
        (1, 37, 96, 32, GemvConfig(16, 32, 1, 4)),
        (1, 70, 320, 32, GemvConfig(32, 64, 3, 2)),
        (2, 37, 192, 64, GemvConfig(32, 128, 2, 1)),
    ]
    for m, n, k, group, cfg in cases:
        x = torch.randint(-3, 4, (m, k), device=DEVICE, generator=gen).float()
        if group == 0:
            q = torch.randint(-128, 128, (n, k), device=DEVICE, generator=gen, dtype=torch.int8)
            q[0], q[1], q[2, ::2], q[2, 1::2] = -128, 127, -128, 127
            scales = 2.0 ** torch.randint(-3, 2, (n,), device=DEVICE, generator=gen).float()
            ref = x.double() @ (q.double() * scales.double()[:, None]).t()
            wk, s, kind = q, scales, "int8"
        else:
            codes = torch.randint(0, 16, (n, k), device=DEVICE, generator=gen, dtype=torch.uint8)
            codes[0], codes[1], codes[2, ::2], codes[2, 1::2] = 0, 15, 0, 15
            scale = 2.0 ** torch.randint(-2, 2, (k // group, n), device=DEVICE, generator=gen).float()
            zero = torch.randint(-4, 5, (k // group, n), device=DEVICE, generator=gen).float()
            sz = torch.stack([scale, zero], dim=-1)
            if group == 64:  # bf16 scales and zeros (exact here)
                sz = sz.to(torch.bfloat16)
            deq = dequantize_int4(codes, sz.float(), group).double()
            # the reference dequantization itself: (code - 8) * scale + zero
            groups = codes.double().view(n, k // group, group) - 8
            assert torch.equal(deq, (groups * scale.t().double()[..., None] + zero.t().double()[..., None]).view(n, k))
            ref = x.double() @ deq.t()
            wk, s, kind = pack_int4(codes, group), sz, "int4"
        for dequant in (gemv_kernels.CAST, gemv_kernels.BITS, gemv_kernels.PTX):
            c = cfg._replace(dequant=dequant)
            out = run(kind, x, wk, s, False, group, c)
            name = gemv_kernels.DEQUANT_NAMES[dequant] + ("" if ptx or dequant != gemv_kernels.PTX else " (as bits)")
            assert torch.equal(out, ref), (kind, name, m, n, k, group, c, (out - ref).abs().max().item())
    print("gemv dequantization exact")


def check_split_argument() -> None:
    """The number of partial sums is an argument of each op, fixed by the wrapper from the config: it
    is a constant of the traced graph (so a compiled graph cached on disk is keyed by it), and an op
    called with another count than its config gives refuses."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x, w = torch.randn(1, 96).to(DEVICE), torch.randn(40, 96).to(DEVICE)
    key = ("float", 40, 96, 0)
    gemv_kernels.OVERRIDES[key] = GemvConfig(16, 32, 3, 4)
    try:
        graph = make_fx(lambda x, w: gemv_kernels.gemv_float(x, w), tracing_mode="fake")(x, w)
        calls = [n for n in graph.graph.nodes if n.target == torch.ops.deepseek_serve.gemv_float.default]
        assert len(calls) == 1 and calls[0].args[2:] == (False, 3), calls
        assert tuple(calls[0].meta["val"].shape) == (3, 1, 40)
        try:
            torch.ops.deepseek_serve.gemv_float(x, w, False, 2)
        except ValueError as exc:
            assert "2 partial sums" in str(exc), exc
        else:
            raise AssertionError("a split count other than the config's was accepted")
    finally:
        gemv_kernels.OVERRIDES.pop(key, None)
    print("gemv split argument ok")


def check_linears() -> None:
    """Int8Linear / Int4Linear (Triton layout) at one row through the GEMV kernels, bias and SiLU·up
    included, against their dequantized weights."""
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(128, 40, bias=True).to(DEVICE)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 128, generator=g) * 0.05)
    x = torch.randn(1, 1, 128, generator=g).to(DEVICE)
    gu = torch.randn(1, 256, generator=g).to(DEVICE)
    q8 = Int8Linear(lin)
    q4 = Int4Linear(lin, 32, kernel="triton")
    w8 = q8.weight.float() * q8.scales.float()[:, None]
    for q, w in ((q8, w8), (q4, q4.dequantized(torch.float32))):
        q.gemv = True  # on CPU too (Triton's interpreter)
        torch.testing.assert_close(q(x), x @ w.t() + lin.bias, atol=1e-4, rtol=1e-4)
        fused = gemv_kernels.gemv_finish(q.gemv_partials(gu, silu=True), torch.float32)
        torch.testing.assert_close(fused, activation(gu, True).float() @ w.t(), atol=1e-4, rtol=1e-4)
    print("gemv linears ok")


def greedy(model: CausalLM, step: DecodeStep | None, prompt: list[int], new_tokens: int) -> tuple[list[int], Tensor]:
    """One row fed token by token (the prompt, then its own argmax) through `step` (or the eager
    model); (the new tokens, the logits of the first)."""
    s = len(prompt) + new_tokens
    model.setup_rope(s + 1, DEVICE)
    cache = KVCache(model.args, 1, s, torch.float32, DEVICE)
    tok, out, first = prompt[0], [], None
    with torch.inference_mode():
        for i in range(s - 1):
            pos = torch.tensor([[i]], device=DEVICE)
            mask = additive_mask((torch.arange(s, device=DEVICE)[None, :] <= pos).view(1, 1, 1, s), torch.float32)
            fb = ForwardBatch(slots=None, positions=pos, write_pos=pos, mask=mask)
            tokens = torch.tensor([[tok]], device=DEVICE)
            logits = step(tokens, cache, fb)[0] if step is not None else model(tokens, cache, fb)[:, 0]
            if i + 1 < len(prompt):
                tok = prompt[i + 1]
                continue
            first = logits if first is None else first
            tok = int(logits.argmax(-1))
            out.append(tok)
    assert first is not None
    return out, first


def check_decode_step(path: Path) -> None:
    """A tiny Qwen2 model, one row: the compiled decode step (aot_eager on CPU) with the fused
    SiLU·down GEMV gives the eager model's greedy tokens; with int8 / int4 (Triton layout) layers
    through the GEMV kernels, the tokens of the same quantized layers through the older kernels."""
    prompt = [5, 17, 200, 3, 99]
    model = load_model(path, torch.float32, DEVICE)
    ref_tokens, ref_logits = greedy(model, None, prompt, 8)
    step = DecodeStep(model, attention="sdpa", backend="aot_eager", gemv_down=True)
    assert step.ops_one.gemv_down
    tokens, logits = greedy(model, step, prompt, 8)
    assert tokens == ref_tokens, (tokens, ref_tokens)
    assert rel_err(logits, ref_logits) < 1e-4, rel_err(logits, ref_logits)
    for mode in ("int8", "int4"):
        old = load_model(path, torch.float32, DEVICE)
        new = load_model(path, torch.float32, DEVICE)
        for m, gemv in ((old, False), (new, True)):
            quantize_model(m, mode, group_size=32, int4_kernel="triton")  # type: ignore[arg-type]
            for mod in m.modules():
                if isinstance(mod, Int8Linear | Int4Linear):
                    mod.gemv = gemv
        old_tokens, old_logits = greedy(old, None, prompt, 8)
        step = DecodeStep(new, attention="sdpa", backend="aot_eager", gemv_down=True)
        tokens, logits = greedy(new, step, prompt, 8)
        # the older CPU int8 kernel takes bf16 activations: logits agree to bf16 rounding
        assert tokens == old_tokens, (mode, tokens, old_tokens)
        assert rel_err(logits, old_logits) < 2e-2, (mode, rel_err(logits, old_logits))
    print("gemv decode step ok")


if __name__ == "__main__":
    check_kernels()
    check_dequant_exact()
    check_split_argument()
    check_linears()
    if len(sys.argv) > 1:
        check_decode_step(Path(sys.argv[1]))
    print("gemv kernel checks passed")
