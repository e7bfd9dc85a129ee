"""Which upstream serves a request: conversation, then prefix, then load.

1. **A conversation** (a request with a conversation id) has a home: the first upstream in its
   rendezvous order (highest-random-weight hashing of the conversation id with each upstream's
   name). The order depends only on the id and the names, so every gateway replica sends one
   conversation to one upstream, with no shared state, and adding or removing an upstream moves only
   the conversations whose home it was. The home serves unless it is clearly busier than the
   least-loaded candidate; then the next upstream in the order that is not (deterministic too, up
   to the replicas' views of the loads).
2. **A prompt sharing a long prefix** with what an upstream holds goes there, unless that upstream
   is clearly busier. Two sources say who holds what: this router's own memory of prompts it routed
   (chained hashes of the prompt text, see below), and the upstreams' load reports, which summarize
   their prefix caches as chained hashes of token blocks (`engine/prefix_summary.py`; fresh as of
   the last health check, and the same for every gateway). The source whose match covers the larger
   share of the prompt wins; on a tie, this router's memory (it knows the last seconds too).
3. **Otherwise** the less loaded of two candidates picked at random ("power of two choices"). Equal
   loads are broken by how many remembered prefixes each upstream holds, so new conversations spread
   over the pool's prefix caches instead of piling onto the upstream that served a shared system
   prompt last.

``prompt`` is the text the upstream will process, in order (for chat: the rendered conversation),
so that a follow-up turn's prompt starts with the earlier turn's; ``token_ids`` its tokens, when
the caller has them (only they are compared with the upstreams' reports).

Prompt texts are remembered as chained hashes of their first ``prefix_chars`` characters, one per
``BLOCK_CHARS`` block (and one for the whole prompt when shorter): finding the longest remembered
prefix of a prompt costs O(prefix length), and memory is bounded by ``max_entries`` hashes, evicted
least recently used first. The hashes of the last prompts chosen for are kept for `observe`.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from deepseek_serve.engine import prefix_summary

BLOCK_CHARS = 64
"""Prefix granularity: prompts are compared in blocks of this many characters."""

MIN_MATCH_CHARS = 256
"""A shared prefix this long (or the whole prompt, when shorter) counts as long."""

MIN_MATCH_TOKENS = 64
"""The same for a match against an upstream's reported prefix cache (whole token blocks only)."""

MIN_MATCH_FRACTION = 0.5
"""...and it must also cover at least this fraction of the prompt's hashed prefix."""

OWNERS_PER_PREFIX = 4
"""Most recent upstreams remembered per prefix (a shared system prompt lives on several)."""

_RECENT_PROMPTS = 64
"""Prompts whose text hashes `choose` keeps for the `observe` that follows."""


@dataclass(frozen=True)
class Candidate:
    """One upstream that may take the request now.

    ``load`` is (running + waiting + gateway in-flight) / capacity from the upstream's load
    report: 0 idle, 1 full, above 1 queueing. ``math.inf`` marks an upstream to use last.
    ``cached_blocks``: the block digests its last load report listed (`engine/prefix_summary.py`).
    """

    name: str
    load: float
    cached_blocks: frozenset[bytes] = frozenset()

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("candidate name must not be empty")
        if math.isnan(self.load) or self.load < 0:
            raise ValueError(f"candidate {self.name!r}: load must be >= 0, got {self.load}")


def rendezvous_order(key: str, names: Sequence[str]) -> list[str]:
    """`names` ordered by their highest-random-weight hash with `key`, highest first: the same on
    every process, and removing a name leaves the order of the others unchanged."""
    prefix = key.encode("utf-8", "surrogatepass") + b"\0"

    def weight(name: str) -> bytes:
        return hashlib.blake2b(prefix + name.encode("utf-8", "surrogatepass"), digest_size=8).digest()

    return sorted(names, key=weight, reverse=True)


class PrefixRouter:
    """Conversation-, prefix- and load-aware choice among upstreams; deterministic under ``seed``.

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
        # upstream name -> remembered prefixes it holds: its share of cached prompts, the tie-breaker
        self._held: Counter[str] = Counter()
        self._recent: OrderedDict[str, list[bytes]] = OrderedDict()

    def choose(
        self,
        prompt: str,
        conversation_id: str | None,
        candidates: Sequence[Candidate],
        token_ids: Sequence[int] | None = None,
    ) -> str:
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
        ceiling = min(loads.values()) + self.busy_margin

        if conversation_id is not None:
            # the least-loaded candidate is always within the margin: this returns
            return next(n for n in rendezvous_order(conversation_id, list(loads)) if loads[n] <= ceiling)

        owner, share = self._remembered_owner(prompt, loads)
        if token_ids is not None and any(c.cached_blocks for c in candidates):
            reported, reported_share = self._reported_owner(token_ids, candidates)
            if reported is not None and reported_share > share:
                owner = reported
        if owner is not None and loads[owner] <= ceiling:
            return owner
        return self._two_choices(candidates)

    def observe(self, prompt: str, conversation_id: str | None, name: str) -> None:
        """Remember that ``name`` served ``prompt``. (A conversation needs no memory: its home
        follows from its id.)"""
        hashes = self._recent.pop(prompt, None)
        for key in self._hashes(prompt) if hashes is None else hashes:
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

    def _remembered_owner(self, prompt: str, loads: dict[str, float]) -> tuple[str | None, float]:
        """(least-loaded candidate holding the longest long-enough remembered prefix, the share of
        the hashed prompt it covers); (None, 0) when there is none."""
        hashes = self._hashes(prompt)
        self._recent[prompt] = hashes
        if len(self._recent) > _RECENT_PROMPTS:
            self._recent.popitem(last=False)
        hashed_chars = min(len(prompt), self.prefix_chars)
        for index in range(len(hashes) - 1, -1, -1):
            matched = min((index + 1) * BLOCK_CHARS, hashed_chars)
            if matched < min(MIN_MATCH_CHARS, hashed_chars) or matched < MIN_MATCH_FRACTION * hashed_chars:
                break
            owners = [n for n in self._prefixes.get(hashes[index], ()) if n in loads]
            if owners:
                self._prefixes.move_to_end(hashes[index])
                return min(reversed(owners), key=lambda n: (loads[n], self._held[n])), matched / hashed_chars
        return None, 0.0

    @staticmethod
    def _reported_owner(token_ids: Sequence[int], candidates: Sequence[Candidate]) -> tuple[str | None, float]:
        """(least-loaded candidate whose reported prefix cache holds the most leading blocks of the
        prompt, when that is long enough; the share of the hashed prompt it covers), else (None, 0)."""
        hashes = prefix_summary.block_hashes(token_ids)
        if not hashes:
            return None, 0.0
        hashed = min(len(token_ids), prefix_summary.MAX_DEPTH_TOKENS)
        best: tuple[int, float] = (0, math.inf)  # (blocks, load)
        owner = None
        for c in candidates:
            if c.cached_blocks:
                n = prefix_summary.matched_blocks(hashes, c.cached_blocks)
                if n and (n > best[0] or (n == best[0] and c.load < best[1])):
                    best, owner = (n, c.load), c.name
        matched = best[0] * prefix_summary.BLOCK_TOKENS
        if owner is None or matched < MIN_MATCH_TOKENS or matched < MIN_MATCH_FRACTION * hashed:
            return None, 0.0
        return owner, matched / hashed

    def _two_choices(self, candidates: Sequence[Candidate]) -> str:
        if len(candidates) == 1:
            return candidates[0].name
        first, second = self._rng.sample(range(len(candidates)), 2)
        a, b = candidates[first], candidates[second]
        return a.name if (a.load, self._held[a.name]) <= (b.load, self._held[b.name]) else b.name
