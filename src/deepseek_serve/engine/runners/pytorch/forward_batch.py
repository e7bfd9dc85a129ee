"""What one forward pass reads besides the tokens: where each row's new tokens go in the KV cache and
what they may attend to."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """bool mask -> 0 / -inf in the model dtype, built once per forward (SDPA would convert per layer)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


@dataclass
class ForwardBatch:
    """Where each row's new tokens go in the cache and what they may attend to.

    Rows map to cache slots through `slots`. `write_pos` is the cache position of each new token
    (a scratch position for padding rows); `mask` [B, 1, T, S] is True where a query may attend, and
    its last dimension S is the number of cache positions read. A packed prefill (`packing`: one row
    of several sequences' prompt chunks) gives each token's slot in `rows`; with `blocks` the
    attention reads the cache in place (`chunk_attention`) and there is no mask; with `kv_concat` the
    keys are the first S / len(slots) positions of each of `slots`, concatenated, under `mask`.
    """

    slots: Tensor | None  # [B] int64; None = rows are slots 0..B-1 (decode over a slot range)
    positions: Tensor  # [B, T] int64 rope positions
    write_pos: Tensor  # [B, T] int64 cache positions
    mask: Tensor | None  # [B, 1, T, S] additive (0 / -inf) or bool; None with `chunk`
    rows: Tensor | None = None  # [B, T] int64 cache slot of each new token (built once per forward)
    lengths: Tensor | None = None  # [B] int64 positions attended (decode with the Triton attention)
    causal_tail: bool = False  # one row whose T new tokens are the last T of the S positions read
    blocks: Tensor | None = None  # [NB, 5] int64 query blocks: B = 1, attention by `chunk_attention`
    kv_concat: bool = False  # B = 1: keys are the S / len(slots) first positions of each slot, in order

    def __post_init__(self) -> None:
        if self.rows is None:
            b, t = self.positions.shape
            slots = self.slots if self.slots is not None else torch.arange(b, device=self.positions.device)
            self.rows = slots.unsqueeze(1).expand(b, t)
