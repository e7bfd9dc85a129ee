"""CUDA graphs of the torch runner: the decode forward, one per (rows, KV length) bucket, and the
prefill chunk forward, one per chunk size; captured on first use into one shared memory pool,
replayed with the step's inputs copied in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.cuda.graphs import _POOL_HANDLE as GraphPool

T = TypeVar("T")

DecodeForward = Callable[[Tensor, int], tuple[Tensor, Tensor]]
"""inputs [3, n] (token, rope position, cache write position), KV length -> (logits [n, V], argmax [n])."""
ChunkForward = Callable[[Tensor, Tensor], Tensor]
"""inputs [3, T] (token, rope position, cache write position), chunk [3] (slot, start, count) ->
logits [1, V] of the chunk's last real token."""

# chunk sizes with a graph: a chunk of n tokens runs in the smallest that holds it, padded
CHUNK_SIZES = (16, 32, 64, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024)


def chunk_size(n: int) -> int | None:
    """The graph size for a chunk of n tokens; None when it is larger than every size."""
    for size in CHUNK_SIZES:
        if n <= size:
            return size
    return None


def chunk_buffer(ids: list[int], slot: int, start: int, size: int, scratch_pos: int) -> Tensor:
    """A chunk graph's inputs on the host, [3 size + 3] int64: tokens, rope positions, cache write
    positions (each `size` long: the chunk, then padding that writes `scratch_pos`), then (slot,
    start, count)."""
    n = len(ids)
    host = torch.empty(3 * size + 3, dtype=torch.int64)
    host[:n] = torch.tensor(ids, dtype=torch.int64)
    host[n:size] = 0
    positions = torch.arange(start, start + size, dtype=torch.int64).clamp_(max=scratch_pos)
    host[size : 2 * size] = positions
    host[2 * size : 3 * size] = positions
    host[2 * size + n : 3 * size] = scratch_pos
    host[3 * size :] = torch.tensor([slot, start, n], dtype=torch.int64)
    return host


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
class ChunkGraph:
    graph: torch.cuda.CUDAGraph
    buffer: Tensor  # [3 T + 3] int64: `inputs` then `chunk`, filled by one copy per replay
    logits: Tensor  # [1, V]


class ChunkGraphs:
    """The captured prefill chunk graphs of one runner, one per size in CHUNK_SIZES, in the decode
    graphs' memory pool (replays never overlap). A chunk is padded to its graph's size: padding tokens
    write the cache's scratch position `scratch_pos` and are not attended to."""

    def __init__(self, forward: ChunkForward, device: torch.device, scratch_pos: int, pool: GraphPool) -> None:
        self._forward = forward
        self._device = device
        self._scratch_pos = scratch_pos
        self._pool = pool
        self._graphs: dict[int, ChunkGraph] = {}

    def __len__(self) -> int:
        return len(self._graphs)

    def get(self, size: int) -> ChunkGraph:
        """The graph for chunks of `size` tokens (one of CHUNK_SIZES), captured now if it is not yet.
        Capturing writes only the scratch position of slot 0."""
        g = self._graphs.get(size)
        if g is not None:
            return g
        buffer = torch.zeros(3 * size + 3, dtype=torch.int64, device=self._device)
        buffer[2 * size : 3 * size].fill_(self._scratch_pos)
        buffer[3 * size + 2] = 1  # (slot 0, start 0, count 1)
        inputs, chunk = buffer[: 3 * size].view(3, size), buffer[3 * size :]
        graph, logits = _capture(lambda: self._forward(inputs, chunk), self._pool)
        g = ChunkGraph(graph, buffer, logits)
        self._graphs[size] = g
        return g

    def replay(self, ids: list[int], slot: int, start: int) -> Tensor:
        """Prefill `ids` at positions start.. of `slot`; logits [1, V] of the last one (a new tensor).
        The chunk must fit a graph (`chunk_size`)."""
        n = len(ids)
        size = chunk_size(n)
        assert size is not None and n > 0
        g = self.get(size)
        host = chunk_buffer(ids, slot, start, size, self._scratch_pos)
        # pinned through torch's caching host allocator, which keeps the block until the copy is done
        g.buffer.copy_(host.pin_memory(), non_blocking=True)
        g.graph.replay()
        return g.logits.clone()  # another chunk of the same size may replay before these are read

    def clear(self) -> None:
        self._graphs.clear()
