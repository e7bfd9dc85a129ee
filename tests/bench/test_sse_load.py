"""bench/sse_load.py's split of a closed-loop load over client processes: every stream runs the same
number of requests, so no process ends the phase alone (a tail the in-process figures do not have)."""

from __future__ import annotations

from types import ModuleType

import pytest

from tests.support.bench_scripts import load_bench_module


@pytest.fixture(scope="module")
def sse_load() -> ModuleType:
    return load_bench_module("sse_load")


@pytest.mark.parametrize(
    ("concurrency", "requests", "procs"), [(64, 128, 6), (128, 256, 8), (8, 16, 2), (1, 4, 1), (64, 100, 6), (3, 9, 8)]
)
def test_requests_follow_each_process_streams(
    sse_load: ModuleType, concurrency: int, requests: int, procs: int
) -> None:
    shares, indexes = sse_load.deal(concurrency, requests, procs)
    assert sum(shares) == concurrency and len(shares) == len(indexes) == min(procs, concurrency)
    assert sorted(i for part in indexes for i in part) == list(range(requests))  # each request once
    rounds = [len(part) / share for share, part in zip(shares, indexes, strict=True)]
    if requests % concurrency == 0:  # every stream runs requests / concurrency of them
        assert rounds == [requests // concurrency] * len(shares)
    else:  # no process more than one request past its fair share
        assert all(
            abs(len(part) - share * requests / concurrency) < 1 for share, part in zip(shares, indexes, strict=True)
        )
