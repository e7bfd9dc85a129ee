"""Checks of the Triton chunk attention and the packed prefill forward, run as a script by
test_chunk_attention.py (and imported by packed_prefill_check.py on a GPU).

A separate process because Triton's CPU interpreter (TRITON_INTERPRET=1, for machines without a
GPU) must be switched on before `triton` is first imported, and torch may import it early.
Usage: python chunk_attention_check.py <checkpoint dir of a tiny model>
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from deepseek_serve.engine.runners.pytorch import chunk_attention as ca
from deepseek_serve.engine.runners.pytorch.chunk_attention import chunk_attention
from deepseek_serve.engine.runners.pytorch.forward_batch import ForwardBatch, additive_mask
from deepseek_serve.engine.runners.pytorch.loading import load_model
from deepseek_serve.engine.runners.pytorch.modules import KVCache
from deepseek_serve.engine.runners.pytorch.ops import attend_sdpa
from deepseek_serve.engine.runners.pytorch.packing import BLOCK_M, PackLayout, Segment, token_rows
from deepseek_serve.engine.runners.pytorch.runner import TorchRunner

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SCRATCH = 7  # the padding rows' cache position: never read by the kernel


def check_kernel() -> None:
    """Against SDPA per segment over the explicit causal mask: GQA and MHA, a head dim that is not a
    power of two, segments at position 0 and further on, a 1-token segment, a segment longer than one
    query block (a tail block), padding rows (zeros) and unused table rows, one segment alone, no
    segment at all; positions past each segment's end and slots no segment reads are never read.
    Once with the KV splits the sizes give, once with a split per KV block (the partial sums and the
    combine)."""
    splits = []
    saved = ca.MIN_SPLIT_BLOCKS
    try:
        for min_blocks in (saved, 1):
            ca.MIN_SPLIT_BLOCKS = min_blocks
            splits += check_cases(only_split=min_blocks == 1)
    finally:
        ca.MIN_SPLIT_BLOCKS = saved
    assert max(splits) > 1 and min(splits) == 1, splits


def check_cases(only_split: bool) -> list[int]:
    """Runs the cases (`only_split`: those that use more than one KV split); the KV splits each used."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    used = []
    # (H, Hk, D, size, max segments, [(slot, start, count)], cache positions)
    cases = [
        (4, 2, 32, 96, 6, [(1, 0, 5), (3, 70, 1), (0, 10, BLOCK_M + 6)], 200),
        (4, 4, 16, 32, 1, [(2, 130, 20)], 160),
        (6, 2, 24, 32, 2, [(1, 0, 16), (2, 33, 16)], 60),
        (8, 1, 64, BLOCK_M + 8, 3, [(0, 5, BLOCK_M + 2), (2, 40, 2)], 140),
        (4, 2, 32, 16, 4, [], 40),
    ]
    # bfloat16 on CUDA only: Triton's CPU interpreter has no bfloat16 arithmetic
    dtypes = ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)) if DEVICE.type == "cuda" else ((torch.float32, 1e-5),)
    for dtype, tol in dtypes:
        for h, hk, d, size, max_segments, spans, s in cases:
            num_slots = 4
            layout = PackLayout(size, max_segments)
            segments = [Segment([0] * count, slot, start) for slot, start, count in spans]
            _, blocks, _ = layout.views(layout.pack(segments).to(DEVICE))
            q = torch.randn(1, size, h, d, dtype=dtype, device=DEVICE, generator=gen)
            kv = torch.randn(num_slots, hk, s + 5, 2 * d, dtype=dtype, device=DEVICE, generator=gen)[:, :, :s]
            used.append(ca.kv_splits(size, h, kv.shape[2], DEVICE))
            if only_split and used[-1] == 1:
                continue
            out = chunk_attention(q, kv, blocks)
            assert out.shape == (1, size, h * d) and out.dtype == dtype, (out.shape, out.dtype)
            offset = 0
            poisoned = torch.full_like(kv, float("nan"))
            for slot, start, count in spans:
                end = start + count
                pos = torch.arange(start, end, device=DEVICE)
                keep = (torch.arange(end, device=DEVICE)[None, :] <= pos[:, None]).view(1, 1, count, end)
                rows = slice(offset, offset + count)
                ref = attend_sdpa(q[:, rows], kv[slot : slot + 1, :, :end], additive_mask(keep, dtype), hk)
                err = (out[:, rows].float() - ref.float()).abs().max().item()
                assert err < tol, f"{dtype} {(h, hk, d, size, spans)} segment {(slot, start, count)}: error {err}"
                poisoned[slot, :, :end] = kv[slot, :, :end]
                offset += count
            assert torch.equal(out[:, offset:], torch.zeros_like(out[:, offset:])), "padding rows are not zero"
            assert torch.equal(chunk_attention(q, poisoned, blocks), out), "read past a segment's positions"
    return used


def check_refusal() -> None:
    blocks = PackLayout(4, 1).views(PackLayout(4, 1).pack([Segment([0] * 4, 0, 0)]).to(DEVICE))[1]
    try:
        chunk_attention(torch.randn(2, 4, 4, 16, device=DEVICE), torch.randn(2, 2, 8, 32, device=DEVICE), blocks)
    except ValueError as exc:
        assert "not one packed chunk row" in str(exc)
    else:
        raise AssertionError("two rows were accepted")


def check_layout() -> None:
    """The block table covers every row once, never two segments in one block, and fits its size for
    the worst cases (every segment ending one row into a block, segments of one token); the rows'
    positions, slots and cache positions it gives (`token_rows`, on the device)."""
    for size, max_segments, lengths in (
        (128, 3, [65, 1, 62]),
        (192, 4, [65, 65, 1, 61]),
        (16, 16, [1] * 16),
        (64, 64, [1] * 63),
        (512, 64, [BLOCK_M + 1] * 7 + [1]),
    ):
        layout = PackLayout(size, max_segments)
        segments = [Segment(list(range(n)), i, 3 * i) for i, n in enumerate(lengths)]
        tokens, blocks, last = layout.views(layout.pack(segments))
        covered = torch.zeros(size, dtype=torch.int64)
        for _, _, offset, count, width in blocks.tolist():
            covered[offset : offset + width] += 1
            assert count in (0, width) and width <= BLOCK_M
        assert torch.equal(covered, torch.ones(size, dtype=torch.int64)), (size, lengths)
        ends = torch.tensor(lengths).cumsum(0) - 1
        assert torch.equal(last[: len(lengths)], ends) and not last[len(lengths) :].any()
        pos, slots, wpos = token_rows(blocks.to(DEVICE), size, SCRATCH).cpu()
        used = int(ends[-1]) + 1
        assert tokens[:used].tolist() == [t for s in segments for t in s.ids] and not tokens[used:].any()
        assert pos[:used].tolist() == [p for s in segments for p in range(s.start, s.start + len(s.ids))]
        assert slots[:used].tolist() == [s.slot for s in segments for _ in s.ids]
        assert torch.equal(wpos[:used], pos[:used]) and (wpos[used:] == SCRATCH).all()
        assert not pos[used:].any() and not slots[used:].any()


def check_packed_forward(checkpoint: Path) -> None:
    """`TorchRunner.packed_forward` (what each packed prefill graph captures), eager here, and the
    masked SDPA path of a runner without the chunk attention: three prompts (slots 2, 0, 1) fed in two
    packed steps of different chunk lengths give the logits and KV of each whole prompt through the
    model's masked forward."""
    model = load_model(checkpoint, torch.float32, DEVICE)
    runners = []
    for kernel in (True, False):
        runner = TorchRunner(
            model, None, num_slots=3, max_len=96, device=DEVICE, dtype=torch.float32, cuda_graphs=False
        )
        runner._chunk_attention = kernel
        runners.append(runner)
    gen = torch.Generator().manual_seed(3)
    prompts = {2: 40, 0: 9, 1: 70}  # slot -> prompt length
    ids = {slot: torch.randint(0, model.args.vocab_size, (n,), generator=gen).tolist() for slot, n in prompts.items()}
    refs = {}
    ref_cache = KVCache(model.args, 3, 96, torch.float32, DEVICE)
    with torch.inference_mode():
        for slot, n in prompts.items():
            pos = torch.arange(n, device=DEVICE)[None, :]
            mask = additive_mask((pos[0][None, :] <= pos[0][:, None]).view(1, 1, n, n), torch.float32)
            fb = ForwardBatch(slots=torch.tensor([slot], device=DEVICE), positions=pos, write_pos=pos, mask=mask)
            refs[slot] = model(torch.tensor([ids[slot]], device=DEVICE), ref_cache, fb)[0]  # [n, V]
        # (slot, start, end) per step; step 1 padded to 64 rows, step 2 to 80, room for 4 segments
        steps = [(64, [(2, 0, 16), (0, 0, 9), (1, 0, 30)]), (80, [(2, 16, 40), (1, 30, 70)])]
        for size, spans in steps:
            segments = [Segment(ids[slot][a:b], slot, a) for slot, a, b in spans]
            layout = PackLayout(size, 4)
            tokens, blocks, last = layout.views(layout.pack(segments).to(DEVICE))
            expected = torch.stack([refs[slot][b - 1] for slot, _, b in spans])
            logits = runners[0].packed_forward(tokens, blocks, last)[: len(spans)]
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(runners[1]._prefill_masked(segments), expected, atol=1e-4, rtol=1e-4)
    for runner in runners:
        for slot, n in prompts.items():
            torch.testing.assert_close(runner.cache.kv[:, slot, :, :n], ref_cache.kv[:, slot, :, :n])
        assert not runner.cache.kv[:, :, :, 70:96].any(), "a position past the prompts was written"


if __name__ == "__main__":
    import time

    t0 = time.perf_counter()
    check_layout()
    check_kernel()
    check_refusal()
    t1 = time.perf_counter()
    check_packed_forward(Path(sys.argv[1]))
    print(f"kernel {t1 - t0:.1f} s, packed forward {time.perf_counter() - t1:.1f} s")
    print("chunk attention checks passed")
