"""Helpers both runners use: prefix matching for prefix reuse, and the checks that keep an entry the
native code would crash on out of a forward pass."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from deepseek_serve.engine.runners import SampleResult, ScheduledSeq


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def entry_refusal(entry: ScheduledSeq, max_len: int, vocab_size: int) -> str | None:
    """Why `entry` cannot be fed to the model (None when it can): its new tokens run past the sequence,
    its reservation or `max_len` positions, or one of them is outside the vocabulary. Native code
    given such input throws or asserts (llama.cpp), or fails a device-side assert that leaves the CUDA
    context unusable (an embedding index on CUDA)."""
    seq, start, k = entry.seq, entry.seq.num_computed_tokens, entry.num_new_tokens
    if k < 1 or start + k > min(seq.num_tokens, seq.max_total_tokens, max_len):
        return f"{k} new tokens at position {start} do not fit the sequence's reservation"
    if k == 1:
        token = seq.token_at(start)
        ok = 0 <= token < vocab_size
    else:
        tokens = seq.all_token_ids[start : start + k]
        ok = min(tokens) >= 0 and max(tokens) < vocab_size
    return None if ok else f"a token id outside the vocabulary [0, {vocab_size})"


def split_refused(
    batch: list[ScheduledSeq], refusal: Callable[[ScheduledSeq], str | None]
) -> tuple[list[SampleResult | None], list[int]]:
    """(one result per entry, failed for the refused ones and None elsewhere; indices of the rest)."""
    results: list[SampleResult | None] = [None] * len(batch)
    accepted: list[int] = []
    for i, entry in enumerate(batch):
        reason = refusal(entry)
        if reason is None:
            accepted.append(i)
        else:
            results[i] = SampleResult.failed(reason)
    return results, accepted
