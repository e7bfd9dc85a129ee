"""Sequence ids ("slots") of llama.cpp's unified KV cache, and the prefix cache of idle ones.

One llama.cpp context holds a unified KV cache of `n_ctx` cells shared by all sequences, and
`n_slots` sequence ids. A running request holds one slot. A finished request's slot keeps its KV as
a prefix-cache entry until the slot or its cells are needed (LRU). A new request reuses the idle slot
with the longest common token prefix (`seq_rm` of the tail), or shares a running sequence's prefix
(`seq_cp`, which only tags the same cells with a second id).

Idle entries are not free: llama.cpp attends over the whole occupied span of the unified cache
(`n_kv`, up to the highest used cell) and skips foreign cells only one by one, and for spans of
512+ cells it splits that span across threads, so cells of idle entries slow every decode step
(measured with this package's default model: 15 idle entries of 160 tokens cost a lone stream 10%).
So an entry whose tokens are a prefix of a newer idle entry (the previous turn of the same
conversation) is dropped at once, and idle entries keep at most `prefix_cache_tokens` cells (LRU).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import llama_cpp as lc

from deepseek_serve.engine.runners.common import common_prefix_len
from deepseek_serve.engine.runners.llamacpp.sampling import SequenceSamplers
from deepseek_serve.engine.sequence import Sequence


@dataclass(eq=False)
class Slot:
    index: int
    tokens: list[int]  # tokens whose KV the slot holds (for idle slots; running: see seq)
    seq: Sequence | None = None
    samplers: SequenceSamplers | None = None
    last_used: float = 0.0

    @property
    def is_idle(self) -> bool:
        return self.seq is None


class SlotPool:
    """The slots of one context's KV memory, their reservations and the prefix cache."""

    def __init__(
        self,
        memory: lc.llama_memory_t,
        n_slots: int,
        n_ctx: int,
        prefix_cache: bool,
        prefix_cache_tokens: int,
        on_clear: Callable[[int], None] | None = None,
    ) -> None:
        self._mem = memory
        self._on_clear = on_clear  # told each slot whose cells are dropped (the draft model drops its own)
        self._n_ctx = n_ctx
        self._prefix_cache = prefix_cache
        self._prefix_cache_tokens = prefix_cache_tokens
        self.slots = [Slot(i, []) for i in range(n_slots)]
        self.reserved = 0  # KV tokens reserved by running sequences

    @property
    def cached_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.slots if s.is_idle)

    def cached_prefixes(self) -> list[tuple[int, ...] | list[int]]:
        """Token ids of the idle entries, most recently used first (any thread: `Slot.tokens` is
        replaced, never mutated)."""
        idle = [(s.last_used, s.tokens) for s in list(self.slots) if s.seq is None]
        idle.sort(key=lambda entry: entry[0], reverse=True)
        return [tokens for _, tokens in idle if tokens]

    def can_allocate(self, seq: Sequence) -> bool:
        has_slot = any(s.is_idle for s in self.slots)
        return has_slot and self.reserved + seq.max_total_tokens <= self._n_ctx

    def allocate(self, seq: Sequence, samplers: SequenceSamplers) -> int:
        """Give `seq` a slot holding as much of its prompt's KV as can be reused; returns the number
        of prompt tokens reused (at least one is always left to compute)."""
        prompt = seq.prompt_token_ids
        slot, reuse, source = self._pick_slot(prompt)
        # make room: idle entries are evicted (least recently used first) until the reservation fits
        need = self.reserved + seq.max_total_tokens
        for victim in sorted(
            (s for s in self.slots if s.is_idle and s is not slot and s.tokens), key=lambda s: s.last_used
        ):
            if need + self.cached_tokens - len(slot.tokens) <= self._n_ctx:
                break
            self._clear(victim)
        if source is not None:
            self._clear(slot)
            lc.llama_memory_seq_cp(self._mem, source.index, slot.index, 0, reuse)
        elif reuse < len(slot.tokens):
            lc.llama_memory_seq_rm(self._mem, slot.index, reuse, -1)
        cached = min(reuse, len(prompt) - 1)
        if cached < reuse:
            lc.llama_memory_seq_rm(self._mem, slot.index, cached, -1)
        slot.tokens = []
        slot.seq = seq
        slot.samplers = samplers
        seq.slot = slot.index
        seq.num_computed_tokens = cached
        seq.num_cached_tokens = cached
        self.reserved += seq.max_total_tokens
        return cached

    def _pick_slot(self, prompt: list[int]) -> tuple[Slot, int, Slot | None]:
        """(slot to use, prefix tokens reusable, running slot to copy the prefix from or None)."""
        idle = [s for s in self.slots if s.is_idle]
        if self._prefix_cache:
            best_idle = max(idle, key=lambda s: (common_prefix_len(s.tokens, prompt), -len(s.tokens)))
            idle_lcp = common_prefix_len(best_idle.tokens, prompt)
            best_run, run_lcp = None, 0
            for s in self.slots:
                if s.seq is not None:
                    lcp = common_prefix_len(s.seq.all_token_ids[: s.seq.num_computed_tokens], prompt)
                    if lcp > run_lcp:
                        best_run, run_lcp = s, lcp
            if idle_lcp >= run_lcp and idle_lcp > 0:
                return best_idle, idle_lcp, None
            if best_run is not None and run_lcp > 0:
                target = min(idle, key=lambda s: (len(s.tokens) > 0, s.last_used))
                return target, run_lcp, best_run
        target = min(idle, key=lambda s: (len(s.tokens) > 0, s.last_used))
        self._clear(target)
        return target, 0, None

    def _clear(self, slot: Slot) -> None:
        if slot.tokens or slot.seq is not None:
            lc.llama_memory_seq_rm(self._mem, slot.index, -1, -1)
        slot.tokens = []
        if self._on_clear is not None:
            self._on_clear(slot.index)

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s slot and samplers; with the prefix cache on, its KV stays as an idle entry."""
        if seq.slot is None:
            return
        slot = self.slots[seq.slot]
        if slot.samplers is not None:
            slot.samplers.free()
            slot.samplers = None
        self.reserved -= seq.max_total_tokens
        slot.seq = None
        slot.last_used = time.monotonic()
        seq.slot = None
        kept = min(seq.num_computed_tokens, seq.num_tokens)
        if kept < seq.num_computed_tokens:
            # speculative guesses past where the engine ended the sequence (a stop token, stop string
            # or max_tokens inside an accepted run) hold KV for tokens the sequence does not have
            lc.llama_memory_seq_rm(self._mem, slot.index, kept, -1)
            seq.num_computed_tokens = kept
        if self._prefix_cache:
            slot.tokens = seq.all_token_ids[:kept]
            self._trim_prefix_cache(slot)
        else:
            slot.tokens = [0]  # force a clear
            self._clear(slot)

    def _trim_prefix_cache(self, newest: Slot) -> None:
        """Drop idle entries that `newest` makes redundant, then the least recently used beyond the budget."""
        n = len(newest.tokens)
        for s in self.slots:
            if (
                s is not newest
                and s.is_idle
                and s.tokens
                and len(s.tokens) <= n
                and newest.tokens[: len(s.tokens)] == s.tokens
            ):
                self._clear(s)
        idle = sorted((s for s in self.slots if s.is_idle and s.tokens), key=lambda s: s.last_used)
        cached = sum(len(s.tokens) for s in idle)
        for s in idle:
            if cached <= self._prefix_cache_tokens:
                break
            cached -= len(s.tokens)
            self._clear(s)

    def clear_idle(self) -> int:
        """Drop every idle entry; returns the cached tokens dropped."""
        dropped = 0
        for s in self.slots:
            if s.is_idle and s.tokens:
                dropped += len(s.tokens)
                self._clear(s)
        return dropped
