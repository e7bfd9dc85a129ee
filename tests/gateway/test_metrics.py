"""`UpstreamCollector`: the per-upstream series come from each upstream's `metrics_snapshot()`."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, cast

from prometheus_client import CollectorRegistry, generate_latest

from deepseek_serve.gateway.metrics import UpstreamCollector
from deepseek_serve.gateway.upstreams import Upstream, UpstreamSpec, UpstreamState


def upstream(name: str, **state: Any) -> Upstream:
    return Upstream(spec=UpstreamSpec(name=name, url=f"http://{name}:8000"), client=cast(Any, None), **state)


def test_every_upstream_reports_its_own_series() -> None:
    healthy = upstream("a", ever_healthy=True, inflight=2, reported_busy=4, capacity=8, served_total=7)
    ejected = upstream("b", ever_healthy=True, open=True, failed_total=3, ejections_total=1)
    for seconds in (0.02, 0.025, 0.3, 100.0):  # 0.025: on a bound, inside its bucket
        healthy.observe_first_token(seconds)
    state = healthy.metrics_snapshot()
    assert state.first_token_counts[1] == 2 and state.first_token_counts[-1] == 1 and sum(state.first_token_counts) == 4
    assert replace(state, first_token_counts=(), first_token_sum=0.0) == UpstreamState(
        name="a", available=True, load=0.75, inflight=2, served_total=7, failed_total=0, ejections_total=0
    )
    registry = CollectorRegistry()
    registry.register(UpstreamCollector({"a": healthy, "b": ejected}))
    text = generate_latest(registry).decode()
    for line in (
        'llm_gateway_upstream_up{upstream="a"} 1.0',
        'llm_gateway_upstream_up{upstream="b"} 0.0',
        'llm_gateway_upstream_load{upstream="a"} 0.75',
        'llm_gateway_upstream_inflight{upstream="a"} 2.0',
        'llm_gateway_upstream_requests_total{upstream="a"} 7.0',
        'llm_gateway_upstream_failures_total{upstream="b"} 3.0',
        'llm_gateway_upstream_ejections_total{upstream="b"} 1.0',
        'llm_gateway_upstream_time_to_first_token_seconds_bucket{le="0.01",upstream="a"} 0.0',
        'llm_gateway_upstream_time_to_first_token_seconds_bucket{le="0.025",upstream="a"} 2.0',
        'llm_gateway_upstream_time_to_first_token_seconds_bucket{le="0.5",upstream="a"} 3.0',
        'llm_gateway_upstream_time_to_first_token_seconds_bucket{le="80.0",upstream="a"} 3.0',
        'llm_gateway_upstream_time_to_first_token_seconds_bucket{le="+Inf",upstream="a"} 4.0',
        'llm_gateway_upstream_time_to_first_token_seconds_count{upstream="a"} 4.0',
        'llm_gateway_upstream_time_to_first_token_seconds_count{upstream="b"} 0.0',
    ):
        assert line in text
