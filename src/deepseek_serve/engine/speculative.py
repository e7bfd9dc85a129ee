"""Speculative decoding, the runner-independent parts: the settings, prompt lookup (n-gram guesses
from the sequence's own tokens), the adaptive draft length and the counters.

A guesser proposes k tokens that likely follow a sequence; the runner feeds the sequence's last
token and the k guesses in one forward pass (logits at all k+1 positions), samples the target
distribution at each position in order and keeps the guesses while the sample equals the guess; the
first sample that differs (or the one after the last guess) is the step's own token. Every token is
drawn from the same distribution, with the same sampler state and random stream, as without the
guesses, so the output is unchanged (for greedy decoding token for token, and for seeded sampling
draw for draw); guesses only save forward passes when they are right.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SpeculativeMode = Literal["off", "ngram", "draft"]


@dataclass(frozen=True)
class SpeculativeConfig:
    """How a runner speculates (DS_SPECULATIVE*)."""

    mode: SpeculativeMode = "off"
    max_draft_tokens: int = 8  # k at most, per sequence and step
    ngram_min: int = 2  # prompt lookup: shortest suffix matched
    ngram_max: int = 4  # prompt lookup: longest suffix matched (tried first)
    max_batch: int = 4  # sequences decoding in one step beyond which nobody speculates (compute-bound)
    draft_cost: float = 0.0  # a draft token's cost relative to a target decode step; 0 = from the weight sizes

    @property
    def enabled(self) -> bool:
        return self.mode != "off" and self.max_draft_tokens > 0


class PromptLookup:
    """Prompt-lookup guesses for one sequence: find the latest earlier occurrence of the sequence's
    last n tokens (longest n first) in its prompt and output, and propose the tokens that followed it.

    The n-gram index grows with the sequence (each token is indexed once), so a lookup costs
    O(new tokens) instead of a scan of the whole history.
    """

    def __init__(self, ngram_min: int, ngram_max: int) -> None:
        assert 1 <= ngram_min <= ngram_max
        self._sizes = range(ngram_max, ngram_min - 1, -1)
        self._index: dict[tuple[int, ...], int] = {}  # n-gram -> end (exclusive) of its latest occurrence
        self._indexed_end = 0  # n-grams ending at or before this position are indexed

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to `k` tokens guessed to follow `tokens` (none without a match)."""
        end = len(tokens)
        if k <= 0 or end < 2:
            return []
        # index n-grams that end before the last position: their continuation is at least one token
        for e in range(max(self._indexed_end + 1, 1), end):
            for n in self._sizes:
                if e >= n:
                    self._index[tuple(tokens[e - n : e])] = e
        self._indexed_end = max(self._indexed_end, end - 1)
        for n in self._sizes:
            if end < n:
                continue
            found = self._index.get(tuple(tokens[end - n :]))
            if found is not None:
                return tokens[found : found + k]
        return []


@dataclass
class AdaptiveDraft:
    """One sequence's draft length, from its measured acceptance.

    Guesses are modelled as accepted one after the other with probability `alpha` each (the chance
    that the next guess is right given that the previous ones were); `alpha` is the ratio of two
    exponential moving averages: guesses accepted, and guesses tried (accepted + the first rejected).
    The length k maximizes expected tokens per step, (1 - alpha^(k+1)) / (1 - alpha), over the step's
    cost, 1 + cost_per_token * k; when no k beats plain decoding the sequence pauses for
    `PROBE_AFTER` steps and then tries one guess again.
    """

    max_k: int
    cost_per_token: float
    alpha_accepted: float = 1.2  # prior: 1.2 of 2 guesses accepted (alpha 0.6)
    alpha_tried: float = 2.0
    paused: int = 0

    DECAY = 0.8
    PROBE_AFTER = 16

    @property
    def alpha(self) -> float:
        return self.alpha_accepted / self.alpha_tried if self.alpha_tried > 0 else 0.0

    def next_k(self) -> int:
        """The draft length for this step (0: decode plainly)."""
        if self.paused > 0:
            self.paused -= 1
            return 1 if self.paused == 0 else 0
        k = best_draft_length(self.alpha, self.max_k, self.cost_per_token)
        if k == 0:
            self.paused = self.PROBE_AFTER
        return k

    def update(self, drafted: int, accepted: int) -> None:
        """Record one verification: `accepted` of `drafted` guesses kept."""
        if drafted <= 0:
            return
        tried = accepted + (1 if accepted < drafted else 0)
        self.alpha_accepted = self.DECAY * self.alpha_accepted + accepted
        self.alpha_tried = self.DECAY * self.alpha_tried + tried


def best_draft_length(alpha: float, max_k: int, cost_per_token: float) -> int:
    """argmax over k in [0, max_k] of expected tokens per step over its cost (0 when nothing gains)."""
    best_k, best = 0, 1.0
    expected, term = 1.0, 1.0
    for k in range(1, max_k + 1):
        term *= alpha
        expected += term  # 1 + alpha + ... + alpha^k
        value = expected / (1.0 + cost_per_token * k)
        if value > best * 1.02:  # a gain under 2% is not worth the risk
            best_k, best = k, value
    return best_k


@dataclass
class SpeculativeCounters:
    """Guesses drafted and accepted per guesser ("ngram", "draft") since start."""

    drafted: dict[str, int] = field(default_factory=dict)
    accepted: dict[str, int] = field(default_factory=dict)

    def add(self, guesser: str, drafted: int, accepted: int) -> None:
        self.drafted[guesser] = self.drafted.get(guesser, 0) + drafted
        self.accepted[guesser] = self.accepted.get(guesser, 0) + accepted

    def snapshot(self) -> tuple[tuple[str, int, int], ...]:
        """(guesser, drafted, accepted) per guesser; any thread (a copy of the keys first)."""
        return tuple((g, self.drafted.get(g, 0), self.accepted.get(g, 0)) for g in sorted(list(self.drafted)))
