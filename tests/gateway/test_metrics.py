"""`UpstreamCollector`: the per-upstream series come from each upstream's `metrics_snapshot()`."""

from __future__ import annotations

from typing import Any, cast

from prometheus_client import CollectorRegistry, generate_latest

from deepseek_serve.gateway.metrics import UpstreamCollector
from deepseek_serve.gateway.upstreams import Upstream, UpstreamSpec, UpstreamState


def upstream(name: str, **state: Any) -> Upstream:
    return Upstream(spec=UpstreamSpec(name=name, url=f"http://{name}:8000"), client=cast(Any, None), **state)


def test_every_upstream_reports_its_own_series() -> None:
    healthy = upstream("a", ever_healthy=True, inflight=2, reported_busy=4, capacity=8, served_total=7)
    ejected = upstream("b", ever_healthy=True, open=True, failed_total=3, ejections_total=1)
    assert healthy.metrics_snapshot() == UpstreamState(
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
    ):
        assert line in text
