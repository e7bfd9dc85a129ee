"""Checks of the Triton chunk attention, run as a script by test_chunk_attention.py.

A separate process because Triton's CPU interpreter (TRITON_INTERPRET=1, for machines without a
GPU) must be switched on before `triton` is first imported, and torch may import it early.
Usage: python chunk_attention_check.py <checkpoint dir of a tiny model>
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from deepseek_serve.engine.runners.pytorch import chunk_attention as ca
from deepseek_serve.engine.runners.pytorch.chunk_attention import BLOCK_M, chunk_attention
from deepseek_serve.engine.runners.pytorch.cuda_graphs import chunk_buffer
from deepseek_serve.engine.runners.pytorch.forward_batch import ForwardBatch, additive_mask
from deepseek_serve.engine.runners.pytorch.loading import load_model
from deepseek_serve.engine.runners.pytorch.modules import KVCache
from deepseek_serve.engine.runners.pytorch.ops import attend_sdpa
from deepseek_serve.engine.runners.pytorch.runner import TorchRunner

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_kernel() -> None:
    """Against SDPA over the explicit causal mask: GQA and MHA, a head dim that is not a power of two,
    chunks at position 0 and further on, padded chunks (padding rows give zeros), a chunk longer than
    one query block, a strided cache view; positions past the chunk's end are never read. Once with
    the KV splits the sizes give, once with a split per KV block (the partial sums and the combine)."""
    splits = []
    for min_blocks in (ca.MIN_SPLIT_BLOCKS, 1):
        ca.MIN_SPLIT_BLOCKS = min_blocks
        splits += check_cases(only_split=min_blocks == 1)
    assert max(splits) > 1 and min(splits) == 1, splits


def check_cases(only_split: bool) -> list[int]:
    """Runs the cases (`only_split`: those that use more than one KV split); the KV splits each used."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    used = []
    # (H, Hk, D, T, start, count, cache positions)
    cases = [
        (12, 2, 128, 64, 100, 50, 256),
        (4, 4, 16, 16, 0, 16, 40),
        (6, 2, 24, 32, 70, 1, 110),
        (8, 1, 64, BLOCK_M + 6, 5, BLOCK_M + 6, 140),
        (4, 2, 32, BLOCK_M + 8, 130, 5, 200),  # a query block of padding only
    ]
    # bfloat16 on CUDA only: Triton's CPU interpreter has no bfloat16 arithmetic
    dtypes = ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)) if DEVICE.type == "cuda" else ((torch.float32, 1e-5),)
    for dtype, tol in dtypes:
        for h, hk, d, t, start, count, s in cases:
            slots, slot = 3, 1
            q = torch.randn(1, t, h, d, dtype=dtype, device=DEVICE, generator=gen)
            kv = torch.randn(slots, hk, s + 5, 2 * d, dtype=dtype, device=DEVICE, generator=gen)[:, :, :s]
            chunk = torch.tensor([slot, start, count], device=DEVICE)
            used.append(ca.kv_splits(t, h, kv.shape[2], DEVICE))
            if only_split and used[-1] == 1:
                continue
            out = chunk_attention(q, kv, chunk)
            assert out.shape == (1, t, h * d) and out.dtype == dtype, (out.shape, out.dtype)
            end = start + count
            pos = torch.arange(start, end, device=DEVICE)
            keep = (torch.arange(end, device=DEVICE)[None, :] <= pos[:, None]).view(1, 1, count, end)
            ref = attend_sdpa(q[:, :count], kv[slot : slot + 1, :, :end], additive_mask(keep, dtype), hk)
            err = (out[:, :count].float() - ref.float()).abs().max().item()
            assert err < tol, f"{dtype} {(h, hk, d, t, start, count, s)}: max error {err}"
            assert torch.equal(out[:, count:], torch.zeros_like(out[:, count:])), "padding rows are not zero"
            poisoned = kv.clone()
            poisoned[slot, :, end:] = float("nan")
            poisoned[slot + 1] = float("nan")
            assert torch.equal(chunk_attention(q, poisoned, chunk), out)
    return used


def check_refusal() -> None:
    chunk = torch.tensor([0, 0, 4], device=DEVICE)
    try:
        chunk_attention(torch.randn(2, 4, 4, 16, device=DEVICE), torch.randn(2, 2, 8, 32, device=DEVICE), chunk)
    except ValueError as exc:
        assert "not one sequence's chunk" in str(exc)
    else:
        raise AssertionError("two rows were accepted")


def check_chunk_forward(checkpoint: Path) -> None:
    """`TorchRunner.chunk_forward` (what each chunk graph captures), eager here: a 40-token prompt in
    chunks of 16 and 24 (padded to 32) gives the logits and KV of the whole prompt through the model's
    masked forward."""
    model = load_model(checkpoint, torch.float32, DEVICE)
    runner = TorchRunner(model, None, num_slots=2, max_len=64, device=DEVICE, dtype=torch.float32, cuda_graphs=False)
    ref_cache = KVCache(model.args, 2, 64, torch.float32, DEVICE)
    ids = torch.randint(0, model.args.vocab_size, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    pos = torch.arange(40, device=DEVICE)[None, :]
    mask = additive_mask((pos[0][None, :] <= pos[0][:, None]).view(1, 1, 40, 40), torch.float32)
    fb = ForwardBatch(slots=torch.tensor([1], device=DEVICE), positions=pos, write_pos=pos, mask=mask)
    with torch.inference_mode():
        ref = model(torch.tensor([ids], device=DEVICE), ref_cache, fb)[0]  # [40, V]
        for start, n, size in ((0, 16, 16), (16, 24, 32)):
            buffer = chunk_buffer(ids[start : start + n], 1, start, size, 64).to(DEVICE)
            logits = runner.chunk_forward(buffer[: 3 * size].view(3, size), buffer[3 * size :])
            torch.testing.assert_close(logits, ref[start + n - 1 : start + n], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(runner.cache.kv[:, 1, :, :40], ref_cache.kv[:, 1, :, :40])
    assert torch.equal(runner.cache.kv[:, 0], torch.zeros_like(runner.cache.kv[:, 0])), "another slot was written"


if __name__ == "__main__":
    import time

    t0 = time.perf_counter()
    check_kernel()
    check_refusal()
    t1 = time.perf_counter()
    check_chunk_forward(Path(sys.argv[1]))
    print(f"kernel {t1 - t0:.1f} s, chunk forward {time.perf_counter() - t1:.1f} s")
    print("chunk attention checks passed")
