"""Checks of the Triton decode attention, run as a script by test_decode_attention.py.

A separate process because Triton's CPU interpreter (TRITON_INTERPRET=1, for machines without a
GPU) must be switched on before `triton` is first imported, and torch may import it early.
Usage: python decode_attention_check.py <checkpoint dir of a tiny model>
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from deepseek_serve.engine.runners.pytorch.compile import DecodeStep
from deepseek_serve.engine.runners.pytorch.forward_batch import ForwardBatch, additive_mask
from deepseek_serve.engine.runners.pytorch.loading import load_model
from deepseek_serve.engine.runners.pytorch.modules import KVCache
from deepseek_serve.engine.runners.pytorch.ops import attend_sdpa

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_kernel() -> None:
    """Against SDPA over an additive mask: GQA and MHA, a head dim that is not a power of two, KV
    lengths across block boundaries (blocks past a row's length are empty), a strided KV view."""
    from deepseek_serve.engine.runners.pytorch.decode_attention import BLOCK_N, decode_attention

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    cases = [(1, 12, 2, 128, 256), (3, 4, 4, 16, 2 * BLOCK_N + 3), (2, 6, 2, 24, BLOCK_N), (4, 8, 1, 64, 5)]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for b, h, hk, d, s in cases:
            q = torch.randn(b, 1, h, d, dtype=dtype, device=DEVICE, generator=gen)
            kv = torch.randn(b + 1, hk, s + 7, 2 * d, dtype=dtype, device=DEVICE, generator=gen)[:b, :, :s]
            lengths = torch.randint(1, s + 1, (b,), device=DEVICE, generator=gen)
            lengths[0] = s
            if b > 1:
                lengths[-1] = 1
            keep = torch.arange(s, device=DEVICE)[None, :] < lengths[:, None]
            ref = attend_sdpa(q, kv, additive_mask(keep.view(b, 1, 1, s), dtype), hk)
            out = decode_attention(q, kv, lengths)
            assert out.shape == ref.shape and out.dtype == dtype, (out.shape, out.dtype)
            err = (out.float() - ref.float()).abs().max().item()
            assert err < tol, f"{dtype} {(b, h, hk, d, s)}: max error {err}"
            # positions past a row's length are never read: NaN there changes nothing
            poisoned = kv.clone()
            for i, n in enumerate(lengths.tolist()):
                poisoned[i, :, n:] = float("nan")
            assert torch.equal(decode_attention(q, poisoned, lengths), out)
    kv = torch.randn(2, 2, 8, 32, device=DEVICE)
    try:
        decode_attention(torch.randn(2, 2, 4, 16, device=DEVICE), kv, torch.ones(2, dtype=torch.long))
    except ValueError as exc:
        assert "not one decode token" in str(exc)
    else:
        raise AssertionError("two tokens per row were accepted")


def check_decode_step(checkpoint: Path) -> None:
    """DecodeStep with the Triton attention (traced with aot_eager) against the eager model."""
    model = load_model(checkpoint, torch.float32, DEVICE)
    model.setup_rope(129, DEVICE)
    step = DecodeStep(model, backend="aot_eager", attention="triton")
    for n, kv_len in ((1, 32), (3, 64)):
        pos = torch.arange(n, device=DEVICE) + 9 * n
        tok = torch.randint(0, model.args.vocab_size, (n, 1), device=DEVICE)
        keep = (torch.arange(kv_len, device=DEVICE)[None, :] <= pos[:, None]).view(n, 1, 1, kv_len)
        fb = ForwardBatch(
            slots=None, positions=pos[:, None], write_pos=pos[:, None], mask=additive_mask(keep, torch.float32)
        )
        caches = [KVCache(model.args, 4, 128, torch.float32, DEVICE) for _ in range(2)]
        for c in caches:
            c.kv.normal_(generator=torch.Generator(device=DEVICE).manual_seed(1))
        with torch.inference_mode():
            ref = model(tok, caches[0], fb)[:, 0]
            logits, greedy = step(tok, caches[1], fb)
        torch.testing.assert_close(logits, ref)
        assert torch.equal(greedy, ref.argmax(dim=-1))
        torch.testing.assert_close(caches[1].kv, caches[0].kv)


if __name__ == "__main__":
    # the decode step first: it must register the kernels' op itself (nothing has imported them yet)
    check_decode_step(Path(sys.argv[1]))
    check_kernel()
    print("decode attention checks passed")
