"""Per-upstream Prometheus series of a gateway, read from each upstream's `metrics_snapshot()` at
scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from deepseek_serve.gateway.upstreams import Upstream


class UpstreamCollector(Collector):
    """`llm_gateway_upstream_*{upstream="name"}`: availability, load, in-flight requests, served
    requests, failures and ejections of every upstream the pool knows now."""

    def __init__(self, upstreams: dict[str, Upstream]) -> None:
        self._upstreams = upstreams

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "llm_gateway_upstream_up",
            "1 while the upstream takes requests (healthy, breaker closed), else 0.",
            labels=["upstream"],
        )
        load = GaugeMetricFamily(
            "llm_gateway_upstream_load",
            "(running + waiting + in-flight) / capacity, as routing sees it.",
            labels=["upstream"],
        )
        inflight = GaugeMetricFamily(
            "llm_gateway_upstream_inflight", "Requests this gateway has open there.", labels=["upstream"]
        )
        served = CounterMetricFamily(
            "llm_gateway_upstream_requests", "Requests the upstream finished.", labels=["upstream"]
        )
        failed = CounterMetricFamily(
            "llm_gateway_upstream_failures",
            "Requests that failed there (a retry elsewhere may have saved them).",
            labels=["upstream"],
        )
        ejected = CounterMetricFamily(
            "llm_gateway_upstream_ejections", "Times its breaker opened.", labels=["upstream"]
        )
        for upstream in list(self._upstreams.values()):
            state = upstream.metrics_snapshot()
            up.add_metric([state.name], 1.0 if state.available else 0.0)
            load.add_metric([state.name], state.load)
            inflight.add_metric([state.name], state.inflight)
            served.add_metric([state.name], state.served_total)
            failed.add_metric([state.name], state.failed_total)
            ejected.add_metric([state.name], state.ejections_total)
        yield from (up, load, inflight, served, failed, ejected)
