"""Speculative decoding, the runner-independent parts: the settings, prompt lookup (n-gram guesses
from the sequence's own tokens), the measured step cost and acceptance that decide how many guesses
each sequence carries per step (`plan_draft_lengths`), and the counters.

A guesser proposes k tokens that likely follow a sequence; the runner feeds the sequence's last
token and the k guesses in one forward pass (logits at all k+1 positions), samples the target
distribution at each position in order and keeps the guesses while the sample equals the guess; the
first sample that differs (or the one after the last guess) is the step's own token. Every token is
drawn from the same distribution, with the same sampler state and random stream, as without the
guesses, so the output is unchanged (for greedy decoding token for token, and for seeded sampling
draw for draw); guesses only save forward passes when they are right.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NamedTuple

if TYPE_CHECKING:
    from deepseek_serve.config import Settings

SpeculativeMode = Literal["off", "ngram", "draft"]


@dataclass(frozen=True)
class SpeculativeConfig:
    """How a runner speculates (DS_SPECULATIVE*)."""

    mode: SpeculativeMode = "off"
    max_draft_tokens: int = 8  # k at most, per sequence and step
    ngram_min: int = 2  # prompt lookup: shortest suffix matched
    ngram_max: int = 4  # prompt lookup: longest suffix matched (tried first)
    max_batch: int = 8  # sequences decoding in one step beyond which nobody speculates
    adaptive: bool = True  # k per sequence and step from measured step costs; False: always k guesses

    @property
    def enabled(self) -> bool:
        return self.mode != "off" and self.max_draft_tokens > 0

    @classmethod
    def from_settings(cls, settings: Settings) -> SpeculativeConfig:
        return cls(
            mode=settings.speculative,
            max_draft_tokens=settings.speculative_k,
            ngram_min=settings.speculative_ngram_min,
            ngram_max=settings.speculative_ngram_max,
            max_batch=settings.speculative_max_batch,
            adaptive=settings.speculative_adaptive,
        )


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


class StepCost:
    """The wall time of a forward step as a function of its token count: a curve seeded by timed
    steps (`seed`, at start) and a scale, both learnt from the steps run (`observe`).

    The scale follows what every step sees (longer KV, other load on the machine: the price of all
    sizes moves together), so sizes the machine has not run lately keep the curve's shape at the
    current price; each step also corrects its own size's point (exponential moving averages; token
    counts fall into buckets, exact up to 16, then four per doubling). `estimate(n)` interpolates
    between the points, never decreases with n, and beyond the measured range prices every token as
    the nearest measured step does (the pessimistic guess for speculation: verification as dear as
    plain steps), as it does when nothing is measured yet.
    """

    DECAY = 0.8  # weight of the past in the scale
    POINT_DECAY = 0.95  # ... and in each point (slower: a price that moves for all sizes moves the scale)

    def __init__(self) -> None:
        self._points: dict[int, tuple[float, float]] = {}  # bucket -> (mean tokens, mean seconds / scale)
        self._curve: list[tuple[float, float]] | None = None  # sorted, seconds made non-decreasing
        self.scale = 1.0

    @staticmethod
    def bucket(num_tokens: int) -> int:
        if num_tokens <= 16:
            return num_tokens
        step = 1 << (num_tokens.bit_length() - 3)
        return (num_tokens + step // 2) // step * step

    def seed(self, num_tokens: int, seconds: float) -> None:
        """Set the point of `num_tokens` tokens at the current scale (a timed step at start)."""
        if num_tokens > 0 and seconds > 0:
            self._points[self.bucket(num_tokens)] = (float(num_tokens), seconds / self.scale)
            self._curve = None

    def observe(self, num_tokens: int, seconds: float) -> None:
        """Record one step of `num_tokens` tokens that took `seconds`."""
        if num_tokens <= 0 or seconds <= 0:
            return
        if not self._points:
            self.seed(num_tokens, seconds)
            return
        d = self.DECAY
        self.scale = d * self.scale + (1 - d) * seconds / self.estimate(num_tokens) * self.scale
        b = self.bucket(num_tokens)
        old = self._points.get(b)
        shaped = seconds / self.scale
        if old is None:
            self._points[b] = (float(num_tokens), shaped)
        else:
            d = self.POINT_DECAY
            self._points[b] = (d * old[0] + (1 - d) * num_tokens, d * old[1] + (1 - d) * shaped)
        self._curve = None

    @property
    def measured(self) -> bool:
        return bool(self._points)

    def describe(self) -> str:
        """The curve at the current scale, "tokens: milliseconds" per point (for logs and benchmarks)."""
        return ", ".join(f"{n:.0f}: {self.scale * t * 1e3:.1f}" for n, t in self._make_curve())

    def estimate(self, num_tokens: int) -> float:
        """Seconds a step of `num_tokens` tokens is expected to take (0 for none)."""
        if num_tokens <= 0:
            return 0.0
        curve = self._make_curve()
        if not curve:
            return float(num_tokens)
        return self.scale * self._shape(float(num_tokens), curve)

    @staticmethod
    def _shape(n: float, curve: list[tuple[float, float]]) -> float:
        first_n, first_t = curve[0]
        last_n, last_t = curve[-1]
        if n <= first_n:
            return first_t * n / first_n
        if n >= last_n:
            return last_t * n / last_n
        for (n0, t0), (n1, t1) in itertools.pairwise(curve):
            if n <= n1:
                return t0 + (t1 - t0) * (n - n0) / (n1 - n0)
        raise AssertionError("unreachable")

    def _make_curve(self) -> list[tuple[float, float]]:
        if self._curve is None:
            curve: list[tuple[float, float]] = []
            for n, t in sorted(self._points.values()):
                if curve and n <= curve[-1][0]:
                    continue
                curve.append((n, max(t, curve[-1][1]) if curve else t))
            self._curve = curve
        return self._curve


@dataclass
class Acceptance:
    """How often a sequence's (or a guesser's) guesses are right, and when to try guessing again.

    Guesses are modelled as accepted one after the other with probability `alpha` each (the chance
    that the next guess is right given that the previous ones were); `alpha` is the ratio of two
    exponential moving averages: guesses accepted, and guesses tried (accepted + the first rejected),
    started from a prior. A sequence the planner leaves without guesses learns nothing new, so every
    `probe_every` such steps its guesses are priced at `PROBE_ALPHA` or better for one step (a probe,
    taken only where that acceptance would pay); each probe doubles the wait for the next one, and
    speculating on its own estimate resets it.
    """

    accepted: float
    tried: float
    decay: float = 0.8
    idle_steps: int = 0  # steps with guesses on offer and none planned, since the last guess
    probe_every: int = 16

    PRIOR_ALPHA = 0.6
    PRIOR_WEIGHT = 2.0  # guesses tried, in the prior
    PROBE_AFTER = 16
    PROBE_ALPHA = 0.8

    @classmethod
    def prior(cls, alpha: float = PRIOR_ALPHA, decay: float = 0.8) -> Acceptance:
        return cls(alpha * cls.PRIOR_WEIGHT, cls.PRIOR_WEIGHT, decay, probe_every=cls.PROBE_AFTER)

    @property
    def alpha(self) -> float:
        return self.accepted / self.tried if self.tried > 0 else 0.0

    @property
    def probe_due(self) -> bool:
        return self.idle_steps >= self.probe_every

    def planning_alpha(self) -> float:
        """The acceptance this step's guesses are priced at: the estimate, or better when a probe is due."""
        return max(self.alpha, self.PROBE_ALPHA) if self.probe_due else self.alpha

    def planned(self, k: int) -> None:
        """Record the planner's choice for a step that had guesses on offer."""
        if k <= 0:
            self.idle_steps += 1
            return
        self.probe_every = (
            self.probe_every * 2 if self.probe_due and self.alpha < self.PROBE_ALPHA else self.PROBE_AFTER
        )
        self.idle_steps = 0

    def update(self, drafted: int, accepted: int) -> None:
        """Record one verification: `accepted` of `drafted` guesses kept."""
        if drafted <= 0:
            return
        tried = accepted + (1 if accepted < drafted else 0)
        self.accepted = self.decay * self.accepted + accepted
        self.tried = self.decay * self.tried + tried


class DraftOffer(NamedTuple):
    """One decoding sequence that may carry guesses this step."""

    alpha: float  # acceptance it is priced at
    max_k: int  # most guesses it can take (prompt lookup: what the lookup found)


def plan_draft_lengths(
    offers: list[DraftOffer],
    *,
    base_tokens: int,
    num_decoding: int,
    target: StepCost,
    draft: StepCost | None = None,
    plain: StepCost | None = None,
    min_value_ratio: float = 1.1,
) -> list[int]:
    """The number of guesses each offer carries this step (0: none), from measured step costs.

    The step without guesses feeds `base_tokens` tokens and samples `num_decoding` decoding
    sequences; plain decoding makes a token in C(m) / m seconds (m = num_decoding, C =
    `target.estimate`), which is what an accepted guess saves. A sequence's j-th guess is accepted
    with probability alpha^j, so for any total K of guesses the best split takes the K most likely
    ones across sequences. K costs C(base + K) - C(base) in the target step, plus with a draft
    model one draft step per guessed position (`draft.estimate` of the sequences still guessing at
    it). With `plain` the guessing rows are verified in a forward apart from the decode step (the
    torch runner): a token is worth plain(m) / m and K guesses over r rows cost C(r + K). The plan is
    the K with the best rate, plain work plus expected saved time over the step's
    cost, among those whose expected saved time exceeds their cost by `min_value_ratio`; K = 0
    when none does (a low acceptance, a batch that is already compute-bound, or a machine where
    verifying a token costs as much as a step).
    """
    ks = [0] * len(offers)
    if not offers or num_decoding <= 0:
        return ks
    # every guess: (probability it is accepted, its depth j, which offer), most likely first
    guesses = [(o.alpha**j, j, i) for i, o in enumerate(offers) if o.alpha > 0 for j in range(1, o.max_k + 1)]
    guesses.sort(key=lambda g: (-g[0], g[1], g[2]))
    if plain is None:
        base_cost = target.estimate(base_tokens)
        per_token = target.estimate(num_decoding) / num_decoding
    else:
        base_cost = plain.estimate(num_decoding)
        per_token = base_cost / num_decoding
    at_depth = [0] * (max((o.max_k for o in offers), default=0) + 1)  # offers guessing at depth j
    expected = draft_cost = 0.0
    best_rate, best_k = 1.0, 0
    for k, (p, j, _) in enumerate(guesses, start=1):
        expected += p
        if draft is not None:
            draft_cost += draft.estimate(at_depth[j] + 1) - draft.estimate(at_depth[j])
        at_depth[j] += 1
        if plain is None:
            extra = target.estimate(base_tokens + k) - base_cost + draft_cost
        else:
            extra = target.estimate(at_depth[1] + k) + draft_cost
        saved = expected * per_token
        if saved < min_value_ratio * extra:
            continue
        rate = (base_cost + saved) / (base_cost + extra)
        if rate > best_rate:
            best_rate, best_k = rate, k
    for _, _, i in guesses[:best_k]:
        ks[i] += 1
    return ks


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
