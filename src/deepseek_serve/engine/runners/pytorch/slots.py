"""KV slot bookkeeping: which sequence owns which cache slot, and the prefix cache of idle slots.

A slot holds up to `max_len` tokens of one sequence. When a sequence is freed its slot becomes
*idle*: its KV stays, keyed by the token ids it holds, until the slot is needed again. A new
sequence whose prompt shares a prefix with an idle slot reuses that KV and recomputes only the rest.

Running sequences are kept in the lowest slots, because a decode step covers slots 0..n-1 (n = the
highest running slot + 1, bucketed): a lone stream in slot 5 would pay for 6 rows. So a new sequence
always takes the lowest slot not running; an idle entry there is first parked in the highest free
slot (or evicted when none is free), and a reusable prefix held elsewhere is copied in. The copies
are returned with the grant for the runner to perform (a few MB of KV: microseconds on a GPU).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass

from deepseek_serve.engine.runners.common import common_prefix_len


@dataclass(frozen=True)
class KVCopy:
    src: int
    dst: int
    num_tokens: int  # positions [0, num_tokens) of slot `src` go to slot `dst`


@dataclass(frozen=True)
class SlotGrant:
    slot: int
    num_cached_tokens: int  # prompt tokens whose KV is in the slot once `copies` are done
    copies: tuple[KVCopy, ...] = ()  # to perform in order before the sequence runs


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

    @property
    def cached_tokens(self) -> int:
        """Tokens the idle prefix entries hold."""
        return sum(len(ids) for ids in self._idle.values())

    def cached_prefixes(self) -> list[tuple[int, ...] | list[int]]:
        """Token ids of the idle entries, most recently used first (any thread: the values are
        tuples, and copying the dict's values happens in C, without a thread switch)."""
        return list(reversed(list(self._idle.values())))

    def clear_idle(self) -> int:
        """Free every idle prefix entry; returns the tokens they held."""
        dropped = self.cached_tokens
        for slot in self._idle:
            heapq.heappush(self._free, slot)
        self._idle.clear()
        return dropped

    def can_allocate(self, num_tokens: int) -> bool:
        return num_tokens <= self.max_len and (bool(self._free) or bool(self._idle))

    def allocate(self, prompt: list[int], num_tokens: int) -> SlotGrant:
        """Reserve the lowest slot not running for a sequence of up to `num_tokens`, reusing the idle
        entry sharing the longest prefix with `prompt` (always leaving >= 1 prompt token to compute)."""
        if not self.can_allocate(num_tokens):
            raise RuntimeError("no KV slot available: call can_allocate first")
        best_slot, best_len = -1, 0
        for slot, ids in self._idle.items():
            n = min(common_prefix_len(ids, prompt), len(prompt) - 1)
            if n > best_len:
                best_slot, best_len = slot, n
        target = min([*self._free[:1], *self._idle])  # the heap's first entry is its lowest slot
        copies: list[KVCopy] = []
        if target in self._idle and target != best_slot:
            ids = self._idle[target]
            if self._free:  # park the entry in the highest free slot
                park = max(self._free)
                self._free.remove(park)
                heapq.heapify(self._free)
                copies.append(KVCopy(target, park, len(ids)))
                self._idle = OrderedDict((park if s == target else s, v) for s, v in self._idle.items())
            else:
                del self._idle[target]
        if target in self._idle:  # it holds the best prefix: reuse it in place
            del self._idle[target]
        else:
            if self._free and self._free[0] == target:
                heapq.heappop(self._free)
            if best_slot >= 0:
                copies.append(KVCopy(best_slot, target, best_len))
                self._idle.move_to_end(best_slot)
        self._reserved[target] = num_tokens
        return SlotGrant(target, best_len, tuple(copies))

    def release(self, slot: int, cached: list[int]) -> None:
        """Give `slot` back; `cached` are the token ids whose KV it holds (kept as a prefix entry)."""
        if self._reserved.pop(slot, None) is None:
            return
        if self.prefix_cache and cached:
            self._idle[slot] = tuple(cached)
        else:
            heapq.heappush(self._free, slot)
