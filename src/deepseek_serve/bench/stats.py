"""Percentiles and summaries of latency samples, and seeded Poisson arrival times."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks.

    Same definition as numpy's default (`method="linear"`). Raises ValueError on no values.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is not between 0 and 100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


@dataclass(frozen=True)
class Summary:
    """Distribution of one metric, in the unit of its samples (seconds for latencies)."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(values: Sequence[float]) -> Summary | None:
    """Mean, p50/p90/p99, min and max; None when there are no samples."""
    if not values:
        return None
    return Summary(
        count=len(values),
        mean=sum(values) / len(values),
        p50=percentile(values, 50.0),
        p90=percentile(values, 90.0),
        p99=percentile(values, 99.0),
        min=min(values),
        max=max(values),
    )


def poisson_arrivals(rate: float, seed: int) -> Iterator[float]:
    """Send times (seconds from start, increasing) of a Poisson process of `rate` requests/s.

    Gaps are exponential with mean 1/rate, drawn from a private `random.Random(seed)`: the same
    seed always gives the same schedule. The first request goes at t=0.
    """
    if not math.isfinite(rate) or rate <= 0.0:
        raise ValueError(f"request rate must be a positive number, got {rate}")
    rng = random.Random(seed)
    t = 0.0
    while True:
        yield t
        t += rng.expovariate(rate)
