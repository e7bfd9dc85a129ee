"""Write the provisioned Grafana dashboard (provisioning/dashboards/deepseek-serve.json).

Edit the panels here, then run `python deploy/monitoring/grafana/make_dashboard.py`; the test
tests/observability/test_names.py checks every metric the JSON uses is exposed by the app or an exporter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "provisioning" / "dashboards" / "deepseek-serve.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
APP = 'job="deepseek-serve"'


def q(expr: str, legend: str = "") -> dict[str, Any]:
    return {"expr": expr, "legendFormat": legend, "datasource": DATASOURCE}


def r(metric: str, selector: str = "") -> str:
    """`rate(metric{job="deepseek-serve", <selector>}[$__rate_interval])`"""
    inner = f"{APP}, {selector}" if selector else APP
    return f"rate({metric}{{{inner}}}[$__rate_interval])"


def hq(p: float, metric: str, by: str = "") -> str:
    return f"histogram_quantile({p}, sum by (le{', ' + by if by else ''}) ({r(metric + '_bucket')}))"


def quantiles(metric: str, by: str = "") -> list[dict[str, Any]]:
    legend_by = f" {{{{{by}}}}}" if by else ""
    return [q(hq(p, metric, by), f"p{int(p * 100)}{legend_by}") for p in (0.5, 0.95, 0.99)]


class Layout:
    """Panels on Grafana's 24-column grid, rows stacked top to bottom."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.y = 0
        self.x = 0
        self.row_h = 0
        self.next_id = 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"type": "row", "title": title, "id": self._id(), "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_h
            self.x = 0
            self.row_h = 0

    def panel(self, title: str, targets: list[dict[str, Any]], unit: str = "short", w: int = 8, h: int = 8,
              kind: str = "timeseries", description: str = "", **extra: Any) -> None:
        if self.x + w > 24:
            self._newline()
        for ref, target in zip("ABCDEFGHIJ", targets, strict=False):
            target["refId"] = ref
        panel: dict[str, Any] = {
            "type": kind, "title": title, "id": self._id(), "datasource": DATASOURCE, "targets": targets,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}} if kind == "timeseries" else {},
        }
        if description:
            panel["description"] = description
        panel.update(extra)
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def build() -> dict[str, Any]:
    lay = Layout()
    rate = "[$__rate_interval]"

    lay.row("Service")
    lay.panel("App up", [q(f"up{{{APP}}}", "{{instance}}")], kind="stat", w=4, h=4)
    lay.panel("Engine ready", [q(f"ds_engine_ready{{{APP}}}", "{{instance}}")], kind="stat", w=4, h=4,
              description="1 when the engine runs, accepts work and is not stalled (as /health/ready).")
    lay.panel("Redis circuit (0 closed, 1 half-open, 2 open)",
              [q(f"ds_redis_circuit_state{{{APP}}}", "{{instance}}")], kind="stat", w=4, h=4)
    lay.panel("HTTP in progress", [q(f"sum(ds_http_requests_in_progress{{{APP}}})")], kind="stat", w=4, h=4)
    lay.panel("Firing alerts", [q('ALERTS{alertstate="firing"}', "{{alertname}} {{instance}}")], kind="table",
              w=8, h=4)
    lay.panel("HTTP requests/s by route and status",
              [q(f"sum by (route, status) ({r('ds_http_requests_total')})", "{{route}} {{status}}")],
              unit="reqps")
    lay.panel("HTTP p95 latency by route",
              [q(hq(0.95, "ds_http_request_duration_seconds", "route"), "{{route}}")], unit="s")
    lay.panel("5xx ratio", [q(
        "sum(" + r("ds_http_requests_total", 'status=~"5.."') + ") / sum("
        + r("ds_http_requests_total") + ")",
        "5xx")], unit="percentunit")

    lay.row("Engine")
    lay.panel("Requests running and waiting", [
        q(f"sum(llm_requests_running{{{APP}}})", "running"),
        q(f"sum(llm_requests_waiting{{{APP}}})", "waiting"),
        q(f"sum(llm_batch_size{{{APP}}})", "batch size"),
        q(f"sum(llm_max_batch_size{{{APP}}})", "max batch size"),
        q(f"sum(llm_max_queue_size{{{APP}}})", "max queue size"),
    ])
    lay.panel("KV cache usage", [q(f"llm_kv_cache_usage_ratio{{{APP}}}", "{{instance}}")], unit="percentunit",
              description="Alert at 95% for 10 minutes.")
    lay.panel("Tokens/s", [
        q(f"sum(rate(llm_prompt_tokens_total{{{APP}}}{rate}))", "prompt"),
        q(f"sum(rate(llm_generation_tokens_total{{{APP}}}{rate}))", "generation"),
    ])
    lay.panel("Time to first token", quantiles("llm_time_to_first_token_seconds"), unit="s")
    lay.panel("Inter-token latency", quantiles("llm_inter_token_latency_seconds"), unit="s")
    lay.panel("End-to-end request latency", quantiles("llm_e2e_request_latency_seconds"), unit="s")
    lay.panel("Queue time", quantiles("llm_request_queue_time_seconds"), unit="s")
    lay.panel("Finished requests/s by finish reason", [
        q(f"sum by (finish_reason) (rate(llm_request_success_total{{{APP}}}{rate}))", "{{finish_reason}}")],
        unit="reqps")
    lay.panel("Rejected requests/s by reason", [
        q(f"sum by (reason) (rate(llm_requests_rejected_total{{{APP}}}{rate}))", "{{reason}}")], unit="reqps")
    lay.panel("Prefix cache hit ratio (tokens)", [q(
        f"sum({r('llm_prefix_cache_hits_total')}) / sum({r('llm_prefix_cache_queries_total')})",
        "hit ratio")], unit="percentunit")
    lay.panel("Tokens per request (p50, p95)", [
        q(hq(0.5, "llm_request_prompt_tokens"), "prompt p50"),
        q(hq(0.95, "llm_request_prompt_tokens"), "prompt p95"),
        q(hq(0.5, "llm_request_generation_tokens"), "generation p50"),
        q(hq(0.95, "llm_request_generation_tokens"), "generation p95"),
    ])
    lay.panel("Engine steps/s", [q(f"sum(rate(llm_engine_steps_total{{{APP}}}{rate}))", "steps")])
    lay.panel("Speculative decoding: accepted / drafted tokens", [q(
        f"sum by (guesser) ({r('llm_speculative_accepted_tokens_total')})"
        f" / sum by (guesser) ({r('llm_speculative_drafted_tokens_total')})",
        "{{guesser}}")], unit="percentunit",
        description="Acceptance rate per guesser (prompt lookup, draft model); no series while speculation is off.")
    lay.panel("Speculative decoding: tokens/s by guesser", [
        q(f"sum by (guesser) ({r('llm_speculative_drafted_tokens_total')})", "drafted {{guesser}}"),
        q(f"sum by (guesser) ({r('llm_speculative_accepted_tokens_total')})", "accepted {{guesser}}"),
    ])

    lay.row("Gateway: upstreams")
    gw = f"{{{APP}}}"
    lay.panel("Upstreams up", [
        q(f"sum(llm_gateway_upstream_up{gw})", "up"),
        q(f"count(llm_gateway_upstream_up{gw})", "known"),
    ], kind="stat", w=4, h=8,
        description="Upstreams taking requests (healthy, breaker closed) / all the gateways know, summed over gateways.")
    lay.panel("Upstream health (1 up, 0 ejected or not yet healthy)",
              [q(f"min by (upstream) (llm_gateway_upstream_up{gw})", "{{upstream}}")], w=10)
    lay.panel("Ejections (breaker opened) per upstream",
              [q(f"sum by (upstream) (increase(llm_gateway_upstream_ejections_total{gw}[$__range]))", "{{upstream}}")],
              kind="bargauge", w=10, description="In the dashboard's time range, summed over gateways.")
    lay.panel("Requests/s per upstream",
              [q(f"sum by (upstream) ({r('llm_gateway_upstream_requests_total')})", "{{upstream}}")], unit="reqps")
    lay.panel("Failures/s per upstream", [
        q(f"sum by (upstream) ({r('llm_gateway_upstream_failures_total')})", "{{upstream}}"),
    ], unit="reqps", description="Requests that failed there; a retry on another upstream may have saved them.")
    lay.panel("Time to first token per upstream (p95)",
              [q(hq(0.95, "llm_gateway_upstream_time_to_first_token_seconds", "upstream"), "{{upstream}}")], unit="s",
              description="From the gateway sending the request to the upstream's first token.")
    lay.panel("Upstream load (1 = every batch slot busy)",
              [q(f"max by (upstream) (llm_gateway_upstream_load{gw})", "{{upstream}}")],
              description="(running + waiting + in flight) / capacity, as the routing policy sees it.")
    lay.panel("In flight per upstream",
              [q(f"sum by (upstream) (llm_gateway_upstream_inflight{gw})", "{{upstream}}")])
    lay.panel("Time to first token, all upstreams", quantiles("llm_gateway_upstream_time_to_first_token_seconds"),
              unit="s")

    lay.row("Gateway: cache, database, spool, process")
    lay.panel("Response cache hit ratio", [q(
        "sum(" + r("ds_response_cache_requests_total", 'result="hit"') + ") / sum("
        + r("ds_response_cache_requests_total") + ")",
        "hit ratio")], unit="percentunit")
    lay.panel("Database pool", [
        q(f"sum(ds_db_pool_in_use{{{APP}}})", "in use"),
        q(f"sum(ds_db_pool_overflow{{{APP}}})", "overflow"),
        q(f"sum(ds_db_pool_size{{{APP}}})", "pool size"),
        q(f"sum(ds_db_pool_max_overflow{{{APP}}})", "max overflow"),
    ])
    lay.panel("Usage records not yet in the database", [
        q(f"max(ds_usage_spool_backlog{{{APP}}})", "spooled on disk"),
        q(f"sum(ds_usage_queue_depth{{{APP}}})", "queued in memory"),
        q(f"min(ds_usage_database_reachable{{{APP}}})", "database reachable (1/0)"),
    ])
    lay.panel("Usage records/s", [
        q(f"sum({r('ds_usage_records_written_total')})", "written"),
        q(f"sum({r('ds_usage_records_spooled_total')})", "spooled"),
        q(f"sum({r('ds_usage_records_rejected_total')})", "rejected"),
    ])
    lay.panel("App memory", [q(f"sum(process_resident_memory_bytes{{{APP}}})", "resident")], unit="bytes")
    lay.panel("App CPU", [q(f"sum(rate(process_cpu_seconds_total{{{APP}}}{rate}))", "cores")])
    lay.panel("App open files", [q(f"sum(process_open_fds{{{APP}}})", "fds")])

    lay.row("MySQL")
    lay.panel("MySQL up", [q("mysql_up", "{{instance}}")], kind="stat", w=4, h=6)
    lay.panel("Connections", [
        q("mysql_global_status_threads_connected", "connected"),
        q("mysql_global_status_threads_running", "running"),
        q("mysql_global_variables_max_connections", "max_connections"),
    ], w=10, h=6)
    lay.panel("Queries/s and slow queries/s", [
        q(f"rate(mysql_global_status_queries{rate})", "queries"),
        q(f"rate(mysql_global_status_slow_queries{rate})", "slow"),
        q(f"rate(mysql_global_status_aborted_connects{rate})", "aborted connects"),
    ], w=10, h=6)

    lay.row("Redis")
    lay.panel("Redis up", [q("redis_up", "{{instance}}")], kind="stat", w=4, h=6)
    lay.panel("Memory", [
        q("redis_memory_used_bytes", "used"),
        q("redis_memory_max_bytes", "maxmemory (0 = unlimited)"),
    ], unit="bytes", w=7, h=6)
    lay.panel("Commands/s and clients", [
        q(f"rate(redis_commands_processed_total{rate})", "commands/s"),
        q("redis_connected_clients", "clients"),
    ], w=7, h=6)
    lay.panel("Keyspace hits, misses, evictions /s", [
        q(f"rate(redis_keyspace_hits_total{rate})", "hits"),
        q(f"rate(redis_keyspace_misses_total{rate})", "misses"),
        q(f"rate(redis_evicted_keys_total{rate})", "evicted"),
    ], w=6, h=6)

    lay.row("Host")
    lay.panel("CPU busy", [q(f'1 - avg by (instance) (rate(node_cpu_seconds_total{{mode="idle"}}{rate}))',
                             "{{instance}}")], unit="percentunit")
    lay.panel("Memory available", [q("node_memory_MemAvailable_bytes / node_memory_MemTotal_bytes",
                                     "{{instance}}")], unit="percentunit")
    lay.panel("Disk free", [q(
        'node_filesystem_avail_bytes{fstype!~"tmpfs|ramfs|overlay|squashfs|nsfs"} '
        '/ node_filesystem_size_bytes{fstype!~"tmpfs|ramfs|overlay|squashfs|nsfs"}', "{{mountpoint}}")],
        unit="percentunit")

    return {
        "uid": "deepseek-serve",
        "title": "deepseek-serve",
        "tags": ["deepseek-serve", "llm"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": []},
        "annotations": {"list": []},
        "panels": lay.panels,
    }


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {OUT}")
