"""A step's prompt chunks packed into one row of tokens, so that one forward (one CUDA graph replay)
prefills several sequences: a packed (varlen) prefill.

Each chunk is a `Segment`: `ids` fed at positions start.. of cache slot `slot`. A `PackLayout` (a
buffer of `size` tokens for at most `max_segments` segments) lays the segments' tokens end to end
from row 0; rows after the last are padding. Everything the forward reads is one int64 tensor,
copied to the device in one copy (`PackLayout.pack`), in three parts (`PackLayout.views`):

- tokens [size] (padding: token 0);
- blocks [NB, 5]: the query blocks of the chunk attention (`chunk_attention`): (slot, pos, offset,
  count, width), at most BLOCK_M rows each and never two segments in one; the padding rows in
  blocks of count 0; unused table rows all zero (width 0);
- last [max_segments]: the row of each segment's last token (0 for unused entries), whose logits
  the forward returns.

The rope position, cache slot and cache position of each row follow from the block table, on the
device (`token_rows`), so the host converts only the tokens and the table.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

BLOCK_M = 64  # query rows per block of the chunk attention
MAX_SEGMENTS = 64  # prompt chunks one packed forward of the runner takes at most
# a forward of `size` token rows takes at most size // SEGMENT_TOKENS segments: each segment may add a
# partly filled query block to the table, and every table row launches its attention programs (times
# the KV splits) whether it holds rows or not; on an H200 a 64-row graph with a table for 64 segments
# spent 7.8 ms at position 7,000 against 2.5 ms for one segment's table
SEGMENT_TOKENS = 16


def segment_cap(size: int, max_segments: int) -> int:
    """Segments a packed forward of `size` token rows takes at most."""
    return max(1, min(max_segments, size // SEGMENT_TOKENS))


def packed_rows(tokens: int, segments: int) -> int:
    """Token rows a packed forward of `segments` segments and `tokens` tokens needs (`segment_cap`)."""
    return max(tokens, SEGMENT_TOKENS * segments) if segments > 1 else tokens


class Segment(NamedTuple):
    """One sequence's prompt chunk: `ids` at positions start, start + 1, ... of cache slot `slot`."""

    ids: list[int]
    slot: int
    start: int


@dataclass(frozen=True)
class PackLayout:
    size: int  # token rows
    max_segments: int

    @property
    def num_blocks(self) -> int:
        """Rows of the block table: enough for any segments that fit. Cutting the `size` rows into
        runs (the segments, then the padding) of lengths c_j costs sum(ceil(c_j / BLOCK_M)) <=
        size // BLOCK_M + runs blocks, and each block holds at least one row."""
        return min(self.size, self.size // BLOCK_M + self.max_segments + 1)

    @property
    def numel(self) -> int:
        return self.size + 5 * self.num_blocks + self.max_segments

    def views(self, buffer: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """buffer [numel] -> (tokens [size], blocks [NB, 5], last [max_segments]), views of it."""
        t, nb = self.size, self.num_blocks
        return buffer[:t], buffer[t : t + 5 * nb].view(nb, 5), buffer[t + 5 * nb :]

    def pack(self, segments: list[Segment]) -> Tensor:
        """The host buffer [numel] int64 for `segments` (at most `max_segments`, `size` tokens in all,
        each at least one token)."""
        if len(segments) > self.max_segments:
            raise ValueError(f"{len(segments)} segments do not fit a layout of {self.max_segments}")
        tok: list[int] = []
        blocks: list[int] = []
        last: list[int] = []
        for ids, slot, start in segments:
            n, offset = len(ids), len(tok)
            assert n > 0, "an empty segment"
            tok += ids
            for i in range(0, n, BLOCK_M):
                count = min(BLOCK_M, n - i)
                blocks += (slot, start + i, offset + i, count, count)
            last.append(offset + n - 1)
        used = len(tok)
        if used > self.size:
            raise ValueError(f"{used} tokens do not fit a layout of {self.size}")
        for i in range(used, self.size, BLOCK_M):
            blocks += (0, 0, i, 0, min(BLOCK_M, self.size - i))
        buf = tok + [0] * (self.size - used)
        buf += blocks + [0] * (5 * self.num_blocks - len(blocks))
        buf += last + [0] * (self.max_segments - len(last))
        # through an array: a third of torch.tensor's time on a list of ints (the tensor holds the array)
        return torch.frombuffer(array("q", buf), dtype=torch.int64)


def token_rows(blocks: Tensor, size: int, scratch_pos: int) -> Tensor:
    """The rope position, cache slot and cache position of each of the `size` rows a block table
    [NB, 5] covers -> [3, size] int64 on its device; padding rows: position 0 of slot 0, written to
    cache position `scratch_pos`. Device operations of fixed shapes only (a CUDA graph captures it)."""
    i = torch.arange(BLOCK_M, device=blocks.device)[None, :]  # [1, BM]
    slot, start, offset, count, width = blocks[:, :, None].unbind(1)  # [NB, 1] each
    real = i < count  # [NB, BM]
    pos = torch.where(real, start + i, 0)
    values = torch.stack([pos, torch.where(real, slot, 0), torch.where(real, pos, scratch_pos)])  # [3, NB, BM]
    # each row is in one block; lanes past a block's width go to a discarded row `size`
    target = torch.where(i < width, offset + i, size).flatten().repeat(3, 1)  # [3, NB BM]
    out = torch.zeros((3, size + 1), dtype=torch.int64, device=blocks.device)
    return out.scatter_(1, target, values.flatten(1))[:, :size]
