"""Which upstream serves a request: prefix-aware, then load-aware.

A request goes back to an upstream that recently served the same conversation, or a prompt
sharing a long prefix with this one (its prefix cache likely still holds those tokens), unless
that upstream is clearly busier than the least-loaded candidate. Otherwise it goes to the
less loaded of two candidates picked at random ("power of two choices"). Equal loads are broken
by how many remembered prefixes each upstream holds, so new conversations spread over the pool's
prefix caches instead of piling onto the upstream that served a shared system prompt last.

``prompt`` is the text the upstream will process, in order (for chat: each message's role and
content, concatenated), so that a follow-up turn's prompt starts with the earlier turn's.

Prefixes are remembered as chained hashes of the prompt's first ``prefix_chars`` characters,
one per ``BLOCK_CHARS`` block (and one for the whole prompt when shorter): finding the longest
remembered prefix of a prompt costs O(prefix length), and memory is bounded by ``max_entries``
hashes plus ``max_entries`` conversation ids, both evicted least recently used first.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

BLOCK_CHARS = 64
"""Prefix granularity: prompts are compared in blocks of this many characters."""

MIN_MATCH_CHARS = 256
"""A shared prefix this long (or the whole prompt, when shorter) counts as long."""

MIN_MATCH_FRACTION = 0.5
"""...and it must also cover at least this fraction of the prompt's hashed prefix."""

OWNERS_PER_PREFIX = 4
"""Most recent upstreams remembered per prefix (a shared system prompt lives on several)."""


@dataclass(frozen=True)
class Candidate:
    """One upstream that may take the request now.

    ``load`` is (running + waiting + gateway in-flight) / capacity from the upstream's load
    report: 0 idle, 1 full, above 1 queueing. ``math.inf`` marks an upstream to use last.
    """

    name: str
    load: float

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("candidate name must not be empty")
        if math.isnan(self.load) or self.load < 0:
            raise ValueError(f"candidate {self.name!r}: load must be >= 0, got {self.load}")


class PrefixRouter:
    """Prefix- and load-aware choice among upstreams; deterministic under ``seed``.

    Not thread-safe: one router per event loop.
    """

    def __init__(
        self,
        *,
        busy_margin: float = 0.75,
        prefix_chars: int = 8192,
        max_entries: int = 65536,
        seed: int | None = None,
    ) -> None:
        if not busy_margin >= 0:
            raise ValueError(f"busy_margin must be >= 0, got {busy_margin}")
        if prefix_chars < BLOCK_CHARS:
            raise ValueError(f"prefix_chars must be >= {BLOCK_CHARS}, got {prefix_chars}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.busy_margin = busy_margin
        self.prefix_chars = prefix_chars
        self.max_entries = max_entries
        self._rng = random.Random(seed)
        # chained prefix hash -> upstream names, most recent last
        self._prefixes: OrderedDict[bytes, tuple[str, ...]] = OrderedDict()
        self._conversations: OrderedDict[str, str] = OrderedDict()
        # upstream name -> remembered prefixes it holds: its share of cached prompts, the tie-breaker
        self._held: Counter[str] = Counter()

    def choose(self, prompt: str, conversation_id: str | None, candidates: Sequence[Candidate]) -> str:
        """The name of the candidate that should serve ``prompt``.

        ``busy_margin`` is in load units: an upstream whose load exceeds the least-loaded
        candidate's by more than that is clearly busier. Raises ValueError when ``candidates``
        is empty or names one upstream twice.
        """
        loads = {c.name: c.load for c in candidates}
        if not loads:
            raise ValueError("no candidates")
        if len(loads) != len(candidates):
            raise ValueError("candidate names must be unique")
        floor = min(loads.values())

        def acceptable(name: str | None) -> bool:
            return name in loads and loads[name] <= floor + self.busy_margin

        if conversation_id is not None:
            owner = self._conversations.get(conversation_id)
            if acceptable(owner):
                assert owner is not None
                return owner

        owner = self._prefix_owner(prompt, loads)
        if owner is not None and acceptable(owner):
            return owner
        return self._two_choices(candidates)

    def observe(self, prompt: str, conversation_id: str | None, name: str) -> None:
        """Remember that ``name`` served ``prompt`` (and the conversation, when given)."""
        if conversation_id is not None:
            self._conversations[conversation_id] = name
            self._conversations.move_to_end(conversation_id)
            if len(self._conversations) > self.max_entries:
                self._conversations.popitem(last=False)
        for key in self._hashes(prompt):
            owners = self._prefixes.get(key, ())
            if name not in owners:
                self._held[name] += 1
                if len(owners) == OWNERS_PER_PREFIX:
                    self._held[owners[0]] -= 1
                    owners = owners[1:]
            self._prefixes[key] = (*(n for n in owners if n != name), name)
            self._prefixes.move_to_end(key)
        while len(self._prefixes) > self.max_entries:
            _, evicted = self._prefixes.popitem(last=False)
            self._held.subtract(evicted)

    def drop(self, name: str) -> None:
        """Forget everything routed to ``name`` (removed or ejected upstream)."""
        for conversation_id in [c for c, n in self._conversations.items() if n == name]:
            del self._conversations[conversation_id]
        for key in [k for k, owners in self._prefixes.items() if name in owners]:
            owners = tuple(n for n in self._prefixes[key] if n != name)
            if owners:
                self._prefixes[key] = owners
            else:
                del self._prefixes[key]
        self._held.pop(name, None)

    def _hashes(self, prompt: str) -> list[bytes]:
        """Chained hashes of the prompt's prefix at each block boundary, shortest first."""
        text = prompt[: self.prefix_chars]
        digest = hashlib.blake2b(digest_size=16)
        out: list[bytes] = []
        for start in range(0, len(text), BLOCK_CHARS):
            digest.update(text[start : start + BLOCK_CHARS].encode("utf-8", "surrogatepass"))
            out.append(digest.copy().digest())
        return out

    def _prefix_owner(self, prompt: str, loads: dict[str, float]) -> str | None:
        """Least-loaded candidate holding the longest long-enough remembered prefix."""
        hashes = self._hashes(prompt)
        hashed_chars = min(len(prompt), self.prefix_chars)
        for index in range(len(hashes) - 1, -1, -1):
            matched = min((index + 1) * BLOCK_CHARS, hashed_chars)
            if matched < min(MIN_MATCH_CHARS, hashed_chars):
                return None
            if matched < MIN_MATCH_FRACTION * hashed_chars:
                return None
            owners = [n for n in self._prefixes.get(hashes[index], ()) if n in loads]
            if owners:
                self._prefixes.move_to_end(hashes[index])
                return min(reversed(owners), key=lambda n: (loads[n], self._held[n]))
        return None

    def _two_choices(self, candidates: Sequence[Candidate]) -> str:
        if len(candidates) == 1:
            return candidates[0].name
        first, second = self._rng.sample(range(len(candidates)), 2)
        a, b = candidates[first], candidates[second]
        return a.name if (a.load, self._held[a.name]) <= (b.load, self._held[b.name]) else b.name
