"""Percentile math, metric aggregation, Poisson arrivals and workloads of the load generator."""

from __future__ import annotations

import itertools
import random
import statistics

import numpy as np
import pytest

from deepseek_serve.bench.client import RequestResult
from deepseek_serve.bench.runner import Phase, compute_metrics
from deepseek_serve.bench.stats import percentile, poisson_arrivals, summarize
from deepseek_serve.bench.workloads import WORKLOADS, Workload


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101, 1000])
def test_percentile_matches_numpy_linear(n: int) -> None:
    rng = random.Random(n)
    values = [rng.expovariate(1.0) for _ in range(n)]
    for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_percentile_small_cases_and_errors() -> None:
    assert percentile([5.0], 99) == 5.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5  # order of input does not matter
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize() -> None:
    values = [float(v) for v in range(1, 101)]
    s = summarize(values)
    assert s is not None
    assert s.count == 100 and s.mean == 50.5 and s.min == 1.0 and s.max == 100.0
    assert s.p50 == pytest.approx(50.5) and s.p90 == pytest.approx(90.1) and s.p99 == pytest.approx(99.01)
    assert summarize([]) is None


def test_poisson_arrivals_reproducible_and_rate_correct() -> None:
    first = list(itertools.islice(poisson_arrivals(4.0, seed=123), 20_000))
    again = list(itertools.islice(poisson_arrivals(4.0, seed=123), 20_000))
    other = list(itertools.islice(poisson_arrivals(4.0, seed=124), 20_000))
    assert first == again
    assert first != other
    assert first[0] == 0.0
    gaps = [b - a for a, b in itertools.pairwise(first)]
    assert all(g >= 0 for g in gaps)
    # mean gap 1/rate; exponential gaps have std == mean (20k samples: within a few percent)
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.05)
    with pytest.raises(ValueError):
        next(poisson_arrivals(0.0, seed=1))


def result(
    index: int, ok: bool = True, status: str = "200", ttft: float = 0.1, e2e: float = 1.0, tokens: int = 10
) -> RequestResult:
    return RequestResult(
        index=index,
        sent_at=0.0,
        status=status,
        ok=ok,
        ttft=ttft if ok else None,
        e2e=e2e,
        prompt_tokens=20 if ok else None,
        output_tokens=tokens if ok else 0,
        usage_reported=ok,
        itl=[0.1] * (tokens - 1) if ok else [],
    )


def test_compute_metrics_counts_errors_and_throughput() -> None:
    results = [
        result(0),
        result(1, ttft=0.3, e2e=2.0),
        result(2, ok=False, status="429"),
        result(3, ok=False, status="429"),
        result(4, ok=False, status="timeout"),
    ]
    m = compute_metrics(results, elapsed_s=2.0)
    assert m["num_requests"] == 5 and m["num_ok"] == 2 and m["num_errors"] == 3
    assert m["error_rate"] == pytest.approx(0.6)
    assert m["errors_by_status"] == {"429": 2, "timeout": 1}
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_token_throughput"] == pytest.approx(10.0)
    assert m["total_token_throughput"] == pytest.approx(30.0)
    assert m["ttft"]["mean"] == pytest.approx(0.2)
    # tpot = (e2e - ttft) / (tokens - 1)
    assert m["tpot"]["max"] == pytest.approx((2.0 - 0.3) / 9)
    assert m["itl"]["count"] == 18
    assert m["usage_reported"] is True


def test_phase_validation_and_labels() -> None:
    assert Phase("closed", 8, num_requests=10).label == "c=8"
    assert Phase("open", 2.5, duration_s=5).label == "rate=2.5/s"
    with pytest.raises(ValueError):
        Phase("closed", 1.5, num_requests=1)
    with pytest.raises(ValueError):
        Phase("open", 1.0)


@pytest.mark.parametrize("name", WORKLOADS)
def test_workloads_are_deterministic(name: str) -> None:
    a = Workload(name, seed=3)
    b = Workload(name, seed=3)
    assert [a.request(i).body for i in range(6)] == [b.request(i).body for i in range(6)]
    assert a.request(0).body["max_tokens"] >= 1


def test_workload_shapes() -> None:
    assert Workload("short").request(0).body != Workload("short").request(1).body
    assert Workload("short", seed=1).request(0).body != Workload("short", seed=2).request(0).body
    assert Workload("repeat").request(0).body == Workload("repeat").request(99).body
    long_prompt = Workload("long-prompt", prompt_words=500).request(0).body["messages"][0]["content"]
    assert len(long_prompt.split()) >= 500
    # multi-turn: turn t of a conversation extends turn t-1, all conversations share the system prompt
    mt = Workload("multi-turn", turns=3)
    t0, t1, t2, next_conv = (mt.request(i).body["messages"] for i in range(4))
    assert [m["role"] for m in t2] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert t1[: len(t0)] == t0 and t2[: len(t1)] == t1
    assert next_conv[0] == t0[0] and next_conv[1] != t0[1]
    completions = Workload("short", endpoint="completions").request(0).body
    assert "prompt" in completions and "messages" not in completions
    with pytest.raises(ValueError, match="unknown workload"):
        Workload("nope")
