"""CUDA graphs of the torch runner's decode forward: one per (rows, KV length) bucket, captured on
first use into one shared memory pool, replayed with the step's inputs copied in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

DecodeForward = Callable[[Tensor, int], tuple[Tensor, Tensor]]
"""inputs [3, n] (token, rope position, cache write position), KV length -> (logits [n, V], argmax [n])."""


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
        self._pool = torch.cuda.graph_pool_handle()

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
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(inputs, kv_len)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits, greedy = self._forward(inputs, kv_len)
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
