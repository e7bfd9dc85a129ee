"""KV slot bookkeeping: which sequence owns which cache slot, and the prefix cache of idle slots.

A slot holds up to `max_len` tokens of one sequence. When a sequence is freed its slot becomes
*idle*: its KV stays, keyed by the token ids it holds, until the slot is needed again. A new
sequence whose prompt shares a prefix with an idle slot takes that slot and recomputes only the rest.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class SlotGrant:
    slot: int
    num_cached_tokens: int  # prompt tokens whose KV is already in the slot


def common_prefix_len(a: list[int] | tuple[int, ...], b: list[int] | tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SlotTable:
    def __init__(self, num_slots: int, max_len: int, prefix_cache: bool = True) -> None:
        self.num_slots = num_slots
        self.max_len = max_len
        self.prefix_cache = prefix_cache
        self._free = list(range(num_slots))  # min-heap: lowest slots first keeps decode batches compact
        self._idle: OrderedDict[int, tuple[int, ...]] = OrderedDict()  # slot -> cached ids, LRU first
        self._reserved: dict[int, int] = {}  # running slot -> reserved tokens

    @property
    def num_running(self) -> int:
        return len(self._reserved)

    @property
    def reserved_tokens(self) -> int:
        return sum(self._reserved.values())

    def can_allocate(self, num_tokens: int) -> bool:
        return num_tokens <= self.max_len and (bool(self._free) or bool(self._idle))

    def allocate(self, prompt: list[int], num_tokens: int) -> SlotGrant:
        """Reserve a slot for a sequence of up to `num_tokens`; reuse the idle slot sharing the
        longest prefix with `prompt` (always leaving >= 1 prompt token to compute)."""
        if not self.can_allocate(num_tokens):
            raise RuntimeError("no KV slot available: call can_allocate first")
        best_slot, best_len = -1, 0
        for slot, ids in self._idle.items():
            n = min(common_prefix_len(ids, prompt), len(prompt) - 1)
            if n > best_len:
                best_slot, best_len = slot, n
        if best_slot >= 0:
            del self._idle[best_slot]
            slot = best_slot
        elif self._free:
            slot = heapq.heappop(self._free)
        else:
            slot, _ = self._idle.popitem(last=False)  # evict the least recently used entry
        self._reserved[slot] = num_tokens
        return SlotGrant(slot, best_len)

    def release(self, slot: int, cached: list[int]) -> None:
        """Give `slot` back; `cached` are the token ids whose KV it holds (kept as a prefix entry)."""
        if self._reserved.pop(slot, None) is None:
            return
        if self.prefix_cache and cached:
            self._idle[slot] = tuple(cached)
        else:
            heapq.heappush(self._free, slot)
