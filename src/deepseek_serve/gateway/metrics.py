"""Per-upstream Prometheus series of a gateway, read from each upstream's `metrics_snapshot()` at
scrape time."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from deepseek_serve.gateway.upstreams import FIRST_TOKEN_BUCKETS, Upstream


class UpstreamCollector(Collector):
    """`llm_gateway_upstream_*{upstream="name"}`: availability, load, in-flight requests, served
    requests, failures, ejections and time to first token of every upstream the pool knows now."""

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
        first_token = HistogramMetricFamily(
            "llm_gateway_upstream_time_to_first_token_seconds",
            "From sending a request to the upstream to its first token (connect, queue, prefill).",
            labels=["upstream"],
        )
        bounds = [*(floatToGoString(b) for b in FIRST_TOKEN_BUCKETS), "+Inf"]
        for upstream in list(self._upstreams.values()):
            state = upstream.metrics_snapshot()
            up.add_metric([state.name], 1.0 if state.available else 0.0)
            load.add_metric([state.name], state.load)
            inflight.add_metric([state.name], state.inflight)
            served.add_metric([state.name], state.served_total)
            failed.add_metric([state.name], state.failed_total)
            ejected.add_metric([state.name], state.ejections_total)
            if state.first_token_counts:
                cumulative = list(itertools.accumulate(state.first_token_counts))
                first_token.add_metric([state.name], list(zip(bounds, cumulative, strict=True)), state.first_token_sum)
        yield from (up, load, inflight, served, failed, ejected, first_token)
