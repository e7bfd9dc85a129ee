"""Every metric the alert rules and the Grafana dashboard use is exposed by the app or by one of the
exporters prometheus.yml scrapes (names read off the real exporters: deploy/monitoring/exporter-metrics.txt),
and the dashboard shows every metric family the app exposes."""

from __future__ import annotations

import json

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from deepseek_serve.cache import build_cache_layer
from deepseek_serve.config import Settings
from deepseek_serve.engine.async_engine import AsyncEngine
from deepseek_serve.engine.types import EngineStats
from deepseek_serve.observability.metrics import PrometheusMetrics, speculative_state
from tests.support.monitoring import (
    BUILTIN_METRICS,
    MONITORING,
    exporter_metric_names,
    promql_metric_names,
    sample_names,
)
from tests.support.settings import make_settings

ISSUE_METRICS = {
    "llm_requests_running",
    "llm_requests_waiting",
    "llm_time_to_first_token_seconds_bucket",
    "llm_inter_token_latency_seconds_bucket",
    "llm_e2e_request_latency_seconds_bucket",
    "llm_request_queue_time_seconds_bucket",
    "llm_prompt_tokens_total",
    "llm_generation_tokens_total",
    "llm_request_success_total",
    "llm_requests_rejected_total",
    "llm_prefix_cache_queries_total",
    "llm_prefix_cache_hits_total",
    "llm_kv_cache_usage_ratio",
    "llm_batch_size",
}
# the families speculative decoding adds while it runs (off in the engine the fixture below builds)
SPECULATIVE = {
    m.name: m.kind
    for m in speculative_state(EngineStats(0, 0, 1, 1, 1, 0, 0.0, 0, 0, 0, 0, 0, True, speculative=(("ngram", 4, 3),)))
}
# process facts no panel needs
NOT_ON_DASHBOARD = {
    "process_virtual_memory_bytes",
    "process_start_time_seconds",
    "process_max_fds",
    "llm_kv_cache_capacity_tokens",
}


@pytest.fixture(scope="module")
def app_metric_families(
    engine: AsyncEngine, settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """{family name: type} of everything the app exposes with every optional part present: the real
    engine, the cache layer with a Redis URL (breaker), the storage layer (pool, usage writer) and a
    gateway's per-upstream series (registered as `build_services` does for `--role gateway`)."""
    from deepseek_serve.gateway.http import Client
    from deepseek_serve.gateway.metrics import UpstreamCollector
    from deepseek_serve.gateway.upstreams import Upstream, UpstreamSpec
    from deepseek_serve.storage.runtime import Storage

    data = tmp_path_factory.mktemp("names")
    full = make_settings(data, redis_url="redis://127.0.0.1:6379/0")
    storage = Storage(full)
    metrics = PrometheusMetrics()
    metrics.attach(engine, storage=storage, cache=build_cache_layer(full))
    spec = UpstreamSpec(name="engine-1", url="http://engine-1:8000")
    upstream = Upstream(spec=spec, client=Client(spec.url, connect_timeout_s=1.0))
    metrics.registry.register(UpstreamCollector({spec.name: upstream}))
    text = metrics.render()[0].decode()
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def app_sample_names(families: dict[str, str]) -> set[str]:
    names: set[str] = set()
    for family, kind in families.items():
        names |= sample_names(family, kind)
        if kind == "counter":
            names.add(f"{family}_total")
    return names


def rule_exprs() -> list[str]:
    exprs = []
    for path in sorted((MONITORING / "rules").glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            exprs.extend(rule["expr"] for rule in group["rules"])
    return exprs


def dashboard_exprs() -> list[str]:
    dashboards = sorted((MONITORING / "grafana" / "provisioning" / "dashboards").glob("*.json"))
    assert dashboards
    exprs = []
    for path in dashboards:
        for panel in json.loads(path.read_text())["panels"]:
            exprs.extend(t["expr"] for t in panel.get("targets", []))
    return exprs


def test_promql_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, route) (rate(foo_bucket{job="a", route=~"x|y"}[5m]))) > 30 '
        'and on(instance) bar_total offset 5m / ignoring(le) baz{a="and"} unless up == bool 1'
    )
    assert promql_metric_names(expr) == {"foo_bucket", "bar_total", "baz", "up"}


def test_app_exposes_every_metric_the_issue_names(app_metric_families: dict[str, str]) -> None:
    exposed = app_sample_names(app_metric_families)
    assert ISSUE_METRICS - exposed == set()
    for gateway in (
        "ds_http_requests_total",
        "ds_http_request_duration_seconds_bucket",
        "ds_response_cache_requests_total",
        "ds_db_pool_in_use",
        "ds_db_pool_overflow",
        "ds_redis_circuit_state",
        "ds_usage_spool_backlog",
        "process_resident_memory_bytes",
    ):
        assert gateway in exposed


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_metric_used_is_exposed_by_the_app_or_an_exporter(
    source: str, app_metric_families: dict[str, str]
) -> None:
    known = app_sample_names(app_metric_families | SPECULATIVE) | set(exporter_metric_names()) | BUILTIN_METRICS
    exprs = rule_exprs() if source == "rules" else dashboard_exprs()
    used = set().union(*(promql_metric_names(e) for e in exprs))
    assert len(used) > 20
    assert used - known == set(), f"{source} use metrics nothing exposes"


def test_rules_and_dashboard_use_mysql_redis_and_node_metrics() -> None:
    exporters = exporter_metric_names()
    used = set().union(*(promql_metric_names(e) for e in rule_exprs() + dashboard_exprs()))
    assert {exporters[n] for n in used if n in exporters} == {"mysql", "redis", "node"}


def test_dashboard_shows_every_app_metric_family(app_metric_families: dict[str, str]) -> None:
    used = set().union(*(promql_metric_names(e) for e in dashboard_exprs()))
    missing = [
        family
        for family, kind in app_metric_families.items()
        if family not in NOT_ON_DASHBOARD and not (app_sample_names({family: kind}) & used)
    ]
    assert missing == []


def test_dashboard_shows_the_speculative_counters() -> None:
    """Speculative decoding's series exist only while it runs (none in the engine the families above
    come from): the families `speculative_state` exposes must be on the dashboard all the same."""
    used = set().union(*(promql_metric_names(e) for e in dashboard_exprs()))
    assert set(SPECULATIVE) == {"llm_speculative_drafted_tokens", "llm_speculative_accepted_tokens"}
    assert all(app_sample_names({family: kind}) & used for family, kind in SPECULATIVE.items())


def test_exporter_list_says_where_it_came_from() -> None:
    text = (MONITORING / "exporter-metrics.txt").read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    for package in ("prometheus-node-exporter", "prometheus-redis-exporter", "prometheus-mysqld-exporter"):
        assert any(package in line for line in header)
