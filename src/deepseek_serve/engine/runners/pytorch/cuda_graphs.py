"""CUDA graphs of the torch runner: the decode forward, one per (rows, KV length) bucket, and the
packed prefill forward (the prompt chunks of up to `max_segments` sequences in one row of tokens),
one per token bucket; captured on first use (the runner's warm-up captures every one it serves) into
one shared memory pool, replayed with the step's inputs copied in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import Tensor

from deepseek_serve.engine.runners.pytorch.packing import PackLayout, Segment, packed_rows, segment_cap

if TYPE_CHECKING:
    from torch.cuda.graphs import _POOL_HANDLE as GraphPool

T = TypeVar("T")

DecodeForward = Callable[[Tensor, int], tuple[Tensor, Tensor]]
"""inputs [3, n] (token, rope position, cache write position), KV length -> (logits [n, V], argmax [n])."""
PackedForward = Callable[[Tensor, Tensor, Tensor], Tensor]
"""tokens [T], blocks [NB, 5], last [S] (see `packing`) -> logits [S, V] of each segment's last token."""

# token buckets with a packed prefill graph: n packed tokens run in the smallest that holds them
CHUNK_SIZES = (16, 32, 64, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024)


def chunk_size(n: int) -> int | None:
    """The graph size for n packed tokens; None when it is larger than every size."""
    for size in CHUNK_SIZES:
        if n <= size:
            return size
    return None


def _capture(forward: Callable[[], T], pool: GraphPool) -> tuple[torch.cuda.CUDAGraph, T]:
    """Run `forward` twice on a side stream (lazy initialization, autotuning), then capture it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = forward()
    return graph, out


@dataclass
class DecodeGraph:
    graph: torch.cuda.CUDAGraph
    inputs: Tensor  # [3, n] int64: token, rope position, cache write position
    host: Tensor  # [3, n] int64, pinned: staging for `inputs`
    logits: Tensor  # [n, V]
    greedy: Tensor  # [n] int64 argmax of logits (the fast path of all-greedy decode steps)


class DecodeGraphs:
    """The captured decode graphs of one runner. `forward` is what each graph records; `scratch_pos`
    the cache position rows without work write to (warm-up rows write there only)."""

    def __init__(self, forward: DecodeForward, device: torch.device, scratch_pos: int) -> None:
        self._forward = forward
        self._device = device
        self._scratch_pos = scratch_pos
        self._graphs: dict[tuple[int, int], DecodeGraph] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def __len__(self) -> int:
        return len(self._graphs)

    def get(self, n: int, kv_len: int) -> DecodeGraph:
        """The graph for n rows reading kv_len positions, captured now if it is not yet."""
        key = (n, kv_len)
        g = self._graphs.get(key)
        if g is not None:
            return g
        inputs = torch.zeros((3, n), dtype=torch.int64, device=self._device)
        inputs[2].fill_(self._scratch_pos)
        graph, (logits, greedy) = _capture(lambda: self._forward(inputs, kv_len), self.pool)
        g = DecodeGraph(graph, inputs, torch.empty((3, n), dtype=torch.int64).pin_memory(), logits, greedy)
        self._graphs[key] = g
        return g

    def replay(self, tok: list[int], pos: list[int], wpos: list[int], kv_len: int) -> tuple[Tensor, Tensor]:
        """Run the graph for len(tok) rows on these inputs; (logits [n, V], argmax [n]), valid until
        the next replay of that graph."""
        g = self.get(len(tok), kv_len)
        g.host.copy_(torch.tensor([tok, pos, wpos], dtype=torch.int64))
        g.inputs.copy_(g.host, non_blocking=True)
        g.graph.replay()
        return g.logits, g.greedy

    def clear(self) -> None:
        self._graphs.clear()


@dataclass
class PackedGraph:
    graph: torch.cuda.CUDAGraph
    layout: PackLayout
    buffer: Tensor  # [layout.numel] int64: inputs, blocks, last; filled by one copy per replay
    logits: Tensor  # [max_segments, V]


class PackedGraphs:
    """The captured packed prefill graphs of one runner, one per token bucket in CHUNK_SIZES (for at
    most min(`max_segments`, bucket) segments), in the decode graphs' memory pool (replays never
    overlap). The segments are padded to their bucket: padding tokens write the cache's scratch
    position and are not attended to."""

    def __init__(self, forward: PackedForward, device: torch.device, pool: GraphPool, max_segments: int) -> None:
        self._forward = forward
        self._device = device
        self._pool = pool
        self.max_segments = max_segments
        self._graphs: dict[int, PackedGraph] = {}

    def __len__(self) -> int:
        return len(self._graphs)

    def get(self, size: int) -> PackedGraph:
        """The graph for `size` tokens (one of CHUNK_SIZES), captured now if it is not yet. Capturing
        writes only the scratch position of slot 0 (no segments: every token is padding)."""
        g = self._graphs.get(size)
        if g is not None:
            return g
        layout = PackLayout(size, segment_cap(size, self.max_segments))
        buffer = layout.pack([]).to(self._device)
        tokens, blocks, last = layout.views(buffer)
        graph, logits = _capture(lambda: self._forward(tokens, blocks, last), self._pool)
        g = PackedGraph(graph, layout, buffer, logits)
        self._graphs[size] = g
        return g

    def replay(self, segments: list[Segment]) -> Tensor:
        """Prefill the segments (at most `max_segments`, their tokens fitting a bucket: `chunk_size`);
        logits [len(segments), V] of each one's last token (a new tensor)."""
        size = chunk_size(packed_rows(sum(len(s.ids) for s in segments), len(segments)))
        assert size is not None and segments
        g = self.get(size)
        host = g.layout.pack(segments)
        # pinned through torch's caching host allocator, which keeps the block until the copy is done
        g.buffer.copy_(host.pin_memory(), non_blocking=True)
        g.graph.replay()
        return g.logits[: len(segments)].clone()  # another replay of this graph may come before these are read

    def clear(self) -> None:
        self._graphs.clear()
