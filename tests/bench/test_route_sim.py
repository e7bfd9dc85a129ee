"""bench/route_sim.py: the simulator is deterministic and its model behaves as the engine does
(prefix reuse, cache bound), so its tables can be trusted to compare routing policies."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

from tests.support.bench_scripts import load_bench_module


@pytest.fixture(scope="module")
def sim() -> ModuleType:
    return load_bench_module("route_sim")


def run(sim: ModuleType, engines: int, policy: str, *, cache_tokens: int = 32768, seed: int = 0) -> Any:
    costs = sim.Costs(3.51, 4.47, 2.45, 0.38, 8, 512, cache_tokens)
    trace = sim.make_trace(seed, engines, 0.08, 240.0, 8, 20.0)
    return sim.simulate(
        trace,
        engines,
        policy,
        costs,
        seed=seed,
        warmup=60.0,
        duration=240.0,
        busy_margin=0.75,
        use_conversation_ids=False,
    )


def test_same_seed_same_result(sim: ModuleType) -> None:
    assert run(sim, 4, "prefix") == run(sim, 4, "prefix")
    assert run(sim, 4, "prefix") != run(sim, 4, "prefix", seed=1)


def test_prefix_routing_keeps_the_hits_round_robin_loses(sim: ModuleType) -> None:
    single = run(sim, 1, "rr")
    rr = run(sim, 4, "rr")
    prefix = run(sim, 4, "prefix")
    assert single.hit_rate > 0.8  # follow-up turns reuse their history on one engine
    assert prefix.hit_rate >= 0.9 * single.hit_rate
    assert rr.hit_rate < 0.8 * single.hit_rate
    assert prefix.busy < rr.busy  # less prefill for the same offered work


def test_a_small_prefix_cache_loses_the_histories(sim: ModuleType) -> None:
    assert run(sim, 1, "rr", cache_tokens=2048).hit_rate < run(sim, 1, "rr").hit_rate - 0.2


def test_command_line_prints_the_table(sim: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert sim.main(["--engines", "1,2", "--duration", "120", "--warmup", "30", "--policies", "rr,prefix"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "engines" not in line]
    assert [row.split("|")[1:3] for row in rows] == [[" 1 ", " (any) "], [" 2 ", " rr "], [" 2 ", " prefix "]]
