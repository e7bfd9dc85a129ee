"""Prometheus metrics: the `Metrics` hooks the API calls, plus state read from the engine and the
service objects.

Two modes, picked when `PrometheusMetrics` is built:

- one process (no `PROMETHEUS_MULTIPROC_DIR`): a private registry; engine and service state is read
  at scrape time by `StateCollector`, so nothing runs between scrapes.
- several Uvicorn workers (`PROMETHEUS_MULTIPROC_DIR` set before `prometheus_client` is imported,
  see `prepare_multiprocess_dir`): every metric is backed by prometheus_client's mmap files in that
  folder; a sampler thread copies engine and service state into them every `sample_interval_s`,
  and a scrape of any worker aggregates all workers' files (`MultiProcessCollector`).

Labels are bounded: finish reasons, rejection reasons, HTTP method, route template and status.
Never a key, a raw path or user text.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from deepseek_serve.engine.types import EngineStats

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

FINISH_REASONS = frozenset({"stop", "length", "abort", "timeout", "error", "cached"})
REJECT_REASONS = frozenset({"queue_full", "rate_limited", "timeout", "circuit_open", "auth"})
HTTP_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})

# NOTE: seconds; chosen for a CPU-served small model (ms per token) up to long GPU generations.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
HTTP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

# NOTE: as /health/ready: an engine with work whose last step is older than this is not ready.
STALL_AFTER_S = 30.0


class StatsSource(Protocol):
    def stats(self) -> EngineStats: ...


# --- state read from the engine and the service objects ------------------------------------------------
GaugeMode = Literal["livesum", "livemax", "livemin"]


@dataclass(frozen=True)
class StateMetric:
    """One value of process state. `mp_mode` says how workers combine in multiprocess mode."""

    name: str
    documentation: str
    kind: Literal["gauge", "counter"]
    value: float
    mp_mode: GaugeMode = "livesum"


def engine_state(stats: EngineStats, accepting: bool, now: float) -> list[StateMetric]:
    """Gauges and counters derived from one `EngineStats` snapshot."""
    has_work = stats.num_running + stats.num_waiting > 0
    stalled = has_work and stats.last_step_monotonic > 0 and now - stats.last_step_monotonic > STALL_AFTER_S
    ready = stats.is_running and accepting and not stalled
    return [
        StateMetric("llm_requests_running", "Sequences in the running batch.", "gauge", stats.num_running),
        StateMetric("llm_requests_waiting", "Requests waiting for a batch slot.", "gauge", stats.num_waiting),
        StateMetric("llm_batch_size", "Sequences decoded together in the current step.", "gauge", stats.num_running),
        StateMetric(
            "llm_max_batch_size", "Configured batch capacity (DS_MAX_BATCH_SIZE).", "gauge", stats.max_batch_size
        ),
        StateMetric(
            "llm_max_queue_size", "Configured queue capacity (DS_MAX_QUEUE_SIZE).", "gauge", stats.max_queue_size
        ),
        StateMetric(
            "llm_kv_cache_usage_ratio",
            "Fraction of KV cache tokens in use (0-1).",
            "gauge",
            stats.kv_usage_ratio,
            "livemax",
        ),
        StateMetric("llm_kv_cache_capacity_tokens", "KV cache capacity in tokens.", "gauge", stats.kv_capacity_tokens),
        StateMetric(
            "ds_engine_ready",
            "1 when the engine runs, accepts work and is not stalled.",
            "gauge",
            1.0 if ready else 0.0,
            "livemin",
        ),
        StateMetric(
            "llm_prompt_tokens", "Prompt tokens processed by the engine.", "counter", stats.prompt_tokens_total
        ),
        StateMetric(
            "llm_generation_tokens", "Tokens generated by the engine.", "counter", stats.generation_tokens_total
        ),
        StateMetric(
            "llm_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            "counter",
            stats.prefix_cache_queries_tokens_total,
        ),
        StateMetric(
            "llm_prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            "counter",
            stats.prefix_cache_hits_tokens_total,
        ),
        StateMetric("llm_engine_steps", "Forward steps run by the engine.", "counter", stats.steps_total),
    ]


def _attr(obj: object, *names: str) -> Any:
    """The first of `names` present on `obj` (None when none is)."""
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return None


def _candidates(services: object) -> Iterator[object]:
    """Service objects and the objects they hold one level down (clients, engines, spools)."""
    seen: set[int] = set()
    roots: list[object] = [
        getattr(services, slot, None)
        for slot in ("auth", "usage", "conversations", "limiter", "response_cache", "sessions")
    ]
    extras = getattr(services, "extras", None)
    if isinstance(extras, dict):
        roots.extend(extras.values())
    for root in roots:
        for obj in (
            root,
            *(
                getattr(root, n, None)
                for n in ("redis", "client", "engine", "db", "db_engine", "storage", "writer", "primary")
            ),
        ):
            if obj is None or id(obj) in seen:
                continue
            seen.add(id(obj))
            yield obj


def services_state(services: object) -> list[StateMetric]:
    """Redis breaker, database pool and usage spool state, read defensively: a slot that is off or an
    object that exposes nothing adds no metric. Never raises."""
    out: list[StateMetric] = []
    breaker_value: float | None = None
    pool_done = False
    spool_done = False
    for obj in _candidates(services):
        try:
            breaker = getattr(obj, "breaker", None)
            if breaker is not None and breaker_value is None:
                value = getattr(breaker, "state_value", None)
                if isinstance(value, int | float):
                    breaker_value = float(value)
            if not pool_done:
                pool_done = _pool_state(obj, out)
            if not spool_done:
                spool_done = _usage_state(obj, out)
        except Exception:  # NOTE: a scrape must not fail because one object misbehaves
            logger.debug("reading metrics state from %r failed", type(obj).__name__, exc_info=True)
    if breaker_value is not None:
        out.append(
            StateMetric(
                "ds_redis_circuit_state",
                "Redis circuit breaker: 0 closed, 1 half-open, 2 open (fallbacks in use).",
                "gauge",
                breaker_value,
                "livemax",
            )
        )
    return out


def _pool_state(obj: object, out: list[StateMetric]) -> bool:
    sync_engine = getattr(obj, "sync_engine", None)
    pool = getattr(sync_engine, "pool", None) if sync_engine is not None else None
    if pool is None or not callable(getattr(pool, "checkedout", None)):
        return False
    size = pool.size() if callable(getattr(pool, "size", None)) else 0
    overflow = pool.overflow() if callable(getattr(pool, "overflow", None)) else 0
    out.append(
        StateMetric("ds_db_pool_size", "Database connections the pool keeps (DS_DB_POOL_SIZE).", "gauge", float(size))
    )
    out.append(
        StateMetric("ds_db_pool_in_use", "Database connections checked out now.", "gauge", float(pool.checkedout()))
    )
    out.append(
        StateMetric(
            "ds_db_pool_overflow", "Connections open beyond the pool size now.", "gauge", float(max(overflow, 0))
        )
    )
    max_overflow = getattr(pool, "_max_overflow", None)
    if isinstance(max_overflow, int) and max_overflow >= 0:
        out.append(
            StateMetric(
                "ds_db_pool_max_overflow", "Allowed overflow (DS_DB_MAX_OVERFLOW).", "gauge", float(max_overflow)
            )
        )
    return True


def _number(value: Any) -> float | None:
    if callable(value):
        value = value()
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    return float(value) if isinstance(value, int | float) else None


def _usage_state(obj: object, out: list[StateMetric]) -> bool:
    """The usage writer (storage.writer.UsageWriter): `spool_backlog()` (else `backlog()`),
    `queue_depth()`, `database_reachable`, `*_total`."""
    backlog = _number(_attr(obj, "spool_backlog", "backlog"))
    if backlog is None:
        return False
    out.append(
        StateMetric(
            "ds_usage_spool_backlog",
            "Usage records spooled on disk, waiting for the database.",
            "gauge",
            backlog,
            "livemax",
        )
    )
    queued = _number(getattr(obj, "queue_depth", None))
    if queued is not None:
        out.append(
            StateMetric("ds_usage_queue_depth", "Usage records in memory, queued or being written.", "gauge", queued)
        )
    reachable = _number(getattr(obj, "database_reachable", None))
    if reachable is not None:
        out.append(
            StateMetric(
                "ds_usage_database_reachable",
                "1 while usage records reach the database.",
                "gauge",
                reachable,
                "livemin",
            )
        )
    for attr, name, doc in (
        ("written_total", "ds_usage_records_written", "Usage records written."),
        ("spooled_total", "ds_usage_records_spooled", "Usage records sent to the spool."),
        ("rejected_total", "ds_usage_records_rejected", "Usage records the database refused."),
    ):
        total = _number(getattr(obj, attr, None))
        if total is not None:
            out.append(StateMetric(name, doc, "counter", total))
    return True


class StateCollector(Collector):
    """Scrape-time collector (one-process mode): engine and service state as metric families."""

    def __init__(self, read: Callable[[], list[StateMetric]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        for m in self._read():
            if m.kind == "gauge":
                family: Metric = GaugeMetricFamily(m.name, m.documentation, value=m.value)
            else:
                family = CounterMetricFamily(m.name, m.documentation, value=m.value)
            yield family


class _Mirror:
    """Multiprocess mode: copies state into this worker's mmap-backed metrics."""

    def __init__(self) -> None:
        self._gauges: dict[str, Gauge] = {}
        self._counters: dict[str, Counter] = {}
        self._last: dict[str, float] = {}

    def update(self, metrics: list[StateMetric]) -> None:
        for m in metrics:
            if m.kind == "gauge":
                gauge = self._gauges.get(m.name)
                if gauge is None:
                    gauge = self._gauges[m.name] = Gauge(
                        m.name, m.documentation, registry=None, multiprocess_mode=m.mp_mode
                    )
                gauge.set(m.value)
            else:
                counter = self._counters.get(m.name)
                if counter is None:
                    counter = self._counters[m.name] = Counter(m.name, m.documentation, registry=None)
                last = self._last.get(m.name, 0.0)
                # NOTE: a total that went down means a new source (engine rebuilt): count it from zero.
                delta = m.value - last if m.value >= last else m.value
                if delta > 0:
                    counter.inc(delta)
                self._last[m.name] = m.value


def _process_state(pid: int) -> list[StateMetric]:
    """RSS, CPU seconds and open files of this process, from /proc (multiprocess mode only; one
    process uses prometheus_client's ProcessCollector)."""
    out: list[StateMetric] = []
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        page = os.sysconf("SC_PAGE_SIZE")
        cpu_s = (float(fields[11]) + float(fields[12])) / ticks
        out.append(StateMetric("process_cpu_seconds", "CPU seconds of the workers.", "counter", cpu_s))
        out.append(
            StateMetric(
                "process_resident_memory_bytes", "Resident memory of all workers.", "gauge", float(fields[21]) * page
            )
        )
        out.append(
            StateMetric(
                "process_open_fds",
                "Open file descriptors of all workers.",
                "gauge",
                float(len(os.listdir(f"/proc/{pid}/fd"))),
            )
        )
    except (OSError, IndexError, ValueError):
        pass
    return out


# --- multiprocess aggregation ----------------------------------------------------------------------------
Labels = tuple[tuple[str, str], ...]


class MultiProcessFilesCollector(Collector):
    """Sums every worker's mmap files into one view: the same samples as prometheus_client's
    `MultiProcessCollector`, computed in one pass with the parsed keys kept across scrapes (keys never
    change meaning), which makes a scrape several times cheaper (bench/metrics_scrape.py)."""

    _MIN = frozenset({"min", "livemin"})
    _MAX = frozenset({"max", "livemax"})
    _SUM = frozenset({"sum", "livesum"})
    _RECENT = frozenset({"mostrecent", "livemostrecent"})

    def __init__(self, path: str) -> None:
        self._path = path
        self._keys: dict[str, tuple[str, str, Labels, str]] = {}

    def _parse(self, key: str) -> tuple[str, str, Labels, str]:
        parsed = self._keys.get(key)
        if parsed is None:
            metric_name, name, labels, help_text = json.loads(key)
            parsed = self._keys[key] = (metric_name, name, tuple(sorted(labels.items())), help_text)
        return parsed

    def collect(self) -> Iterable[Metric]:
        # metric name -> (type, help, gauge mode, {(sample name, labels): value})
        found: dict[str, tuple[str, str, str, dict[tuple[str, Labels], float]]] = {}
        stamps: dict[tuple[str, Labels], float] = {}
        for path in glob.glob(os.path.join(self._path, "*.db")):
            parts = os.path.basename(path).split("_")
            kind = parts[0]
            mode = parts[1] if kind == "gauge" else ""
            try:
                values = MmapedDict.read_all_values_from_file(path)
            except FileNotFoundError:
                if kind == "gauge" and mode.startswith("live"):
                    continue  # NOTE: removed by mark_process_dead between glob and read
                raise
            pid = parts[2][:-3] if kind == "gauge" else ""
            for key, value, timestamp, _ in values:
                metric_name, name, labels, help_text = self._parse(key)
                entry = found.get(metric_name)
                if entry is None:
                    entry = found[metric_name] = (kind, help_text, mode, {})
                acc = entry[3]
                if kind != "gauge" or mode in self._SUM:
                    acc[(name, labels)] = acc.get((name, labels), 0.0) + value
                elif mode in self._MIN:
                    current = acc.get((name, labels))
                    acc[(name, labels)] = value if current is None else min(current, value)
                elif mode in self._MAX:
                    current = acc.get((name, labels))
                    acc[(name, labels)] = value if current is None else max(current, value)
                elif mode in self._RECENT:
                    if stamps.get((name, labels), -1.0) < float(timestamp or 0):
                        stamps[(name, labels)] = float(timestamp or 0)
                        acc[(name, labels)] = value
                else:  # all, liveall: one series per worker
                    acc[(name, (*labels, ("pid", pid)))] = value
        for metric_name, (kind, help_text, _, acc) in found.items():
            metric = Metric(metric_name, help_text, kind)
            if kind == "histogram":
                buckets: dict[Labels, list[tuple[float, float]]] = {}
                for (name, labels), value in acc.items():
                    if name.endswith("_bucket"):
                        le = dict(labels)["le"]
                        rest = tuple(kv for kv in labels if kv[0] != "le")
                        buckets.setdefault(rest, []).append((float(le), value))
                    else:
                        metric.add_sample(name, dict(labels), value)
                for labels, pairs in buckets.items():
                    total = 0.0
                    base = dict(labels)
                    for le_value, value in sorted(pairs):
                        total += value
                        le = floatToGoString(le_value)
                        metric.add_sample(f"{metric_name}_bucket", {**base, "le": le}, total)
                    metric.add_sample(f"{metric_name}_count", base, total)
            else:
                for (name, labels), value in acc.items():
                    metric.add_sample(name, dict(labels), value)
            yield metric


# --- multiprocess folder ---------------------------------------------------------------------------------
def is_multiprocess() -> bool:
    """True when prometheus_client was imported with `PROMETHEUS_MULTIPROC_DIR` set (mmap values)."""
    from prometheus_client import values

    return bool(os.environ.get(MULTIPROC_ENV)) and getattr(values.ValueClass, "__name__", "") == "MmapedValue"


def prepare_multiprocess_dir(data_dir: Path) -> Path:
    """Empty `<data_dir>/prometheus-multiproc` and point `PROMETHEUS_MULTIPROC_DIR` at it.

    Call in the serve command before Uvicorn starts its workers (they inherit the variable and import
    prometheus_client after it is set). Files left by an earlier run are removed, or old counters
    would be added to the new ones.
    """
    path = data_dir / "prometheus-multiproc"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


# --- the Metrics implementation --------------------------------------------------------------------------
class PrometheusMetrics:
    """Implements `api.services.Metrics`; owns the registry `/metrics` renders.

    `attach(engine, services)` once the engine and services exist; `close()` at shutdown.
    """

    def __init__(self, *, sample_interval_s: float = 1.0, process_metrics: bool = True) -> None:
        disable_created_metrics()  # NOTE: process-wide; `*_created` series double the scrape for no alert
        self.multiprocess = is_multiprocess()
        self._sample_interval_s = sample_interval_s
        self._engine: StatsSource | None = None
        self._services: object | None = None
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self._mirror = _Mirror() if self.multiprocess else None
        self._mirror_lock = threading.Lock()
        self._pid = os.getpid()

        self.registry = CollectorRegistry()
        if self.multiprocess:
            self.registry.register(MultiProcessFilesCollector(os.environ[MULTIPROC_ENV]))
            reg: CollectorRegistry | None = None
        else:
            reg = self.registry
            if process_metrics:
                ProcessCollector(registry=self.registry)
            self.registry.register(StateCollector(self._read_state))

        # engine: request-level timings (observed by the API at the end of each request)
        self.ttft = Histogram(
            "llm_time_to_first_token_seconds",
            "Submission to first generated token.",
            buckets=TTFT_BUCKETS,
            registry=reg,
        )
        self.itl = Histogram(
            "llm_inter_token_latency_seconds", "Time between two generated tokens.", buckets=ITL_BUCKETS, registry=reg
        )
        self.e2e = Histogram(
            "llm_e2e_request_latency_seconds", "Submission to last token.", buckets=E2E_BUCKETS, registry=reg
        )
        self.queue = Histogram(
            "llm_request_queue_time_seconds", "Submission to first scheduled.", buckets=QUEUE_BUCKETS, registry=reg
        )
        self.prompt_len = Histogram(
            "llm_request_prompt_tokens", "Prompt tokens per request.", buckets=TOKEN_BUCKETS, registry=reg
        )
        self.generation_len = Histogram(
            "llm_request_generation_tokens", "Generated tokens per request.", buckets=TOKEN_BUCKETS, registry=reg
        )
        self.success = Counter(
            "llm_request_success", "Finished requests by finish reason.", ["finish_reason"], registry=reg
        )
        self.rejections = Counter(
            "llm_requests_rejected", "Requests refused before or during generation.", ["reason"], registry=reg
        )
        # gateway
        self.cache_requests = Counter(
            "ds_response_cache_requests", "Response cache lookups by result.", ["result"], registry=reg
        )
        self.http_requests = Counter(
            "ds_http_requests",
            "HTTP requests by method, route template, status.",
            ["method", "route", "status"],
            registry=reg,
        )
        self.http_latency = Histogram(
            "ds_http_request_duration_seconds",
            "HTTP request start to last body byte, by method and route template.",
            ["method", "route"],
            buckets=HTTP_BUCKETS,
            registry=reg,
        )
        self.http_in_progress = Gauge(
            "ds_http_requests_in_progress", "HTTP requests being served.", registry=reg, multiprocess_mode="livesum"
        )
        # NOTE: children created up front so every series reads 0 before the first event.
        for reason in REJECT_REASONS:
            self.rejections.labels(reason)
        for result in ("hit", "miss"):
            self.cache_requests.labels(result)
        for finish in ("stop", "length"):
            self.success.labels(finish)

    # --- wiring --------------------------------------------------------------------------------------
    def attach(self, engine: StatsSource | None, services: object | None = None) -> None:
        """Read state from `engine.stats()` and the service objects from now on."""
        self._engine = engine
        self._services = services
        if self.multiprocess and self._sampler is None:
            self.sample()
            self._sampler = threading.Thread(target=self._sample_loop, name="metrics-sampler", daemon=True)
            self._sampler.start()

    def close(self) -> None:
        """Stop the sampler; in multiprocess mode drop this worker's live gauges."""
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join(timeout=5.0)
            self._sampler = None
        if self.multiprocess:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(self._pid)

    def _read_state(self) -> list[StateMetric]:
        out: list[StateMetric] = []
        engine = self._engine
        if engine is not None:
            try:
                stats = engine.stats()
                out.extend(engine_state(stats, bool(getattr(engine, "is_accepting", True)), time.monotonic()))
            except Exception:  # NOTE: a scrape must not fail because the engine is gone
                logger.debug("engine.stats() failed during a scrape", exc_info=True)
        if self._services is not None:
            out.extend(services_state(self._services))
        return out

    def sample(self) -> None:
        """Multiprocess mode: copy current state into this worker's files (the sampler's job)."""
        if self._mirror is None:
            return
        state = self._read_state() + _process_state(self._pid)
        with self._mirror_lock:
            self._mirror.update(state)

    def _sample_loop(self) -> None:
        while not self._stop.wait(self._sample_interval_s):
            try:
                self.sample()
            except Exception:  # NOTE: one bad read must not stop the sampler
                logger.exception("metrics sampler failed")

    # --- Metrics protocol ----------------------------------------------------------------------------
    def observe_request(
        self,
        *,
        endpoint: str,
        finish_reason: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int,
        queue_s: float | None,
        ttft_s: float | None,
        e2e_s: float | None,
        itl_s: list[float],
    ) -> None:
        """One finished request (engine-served or a response-cache hit)."""
        reason = finish_reason if finish_reason in FINISH_REASONS else "other"
        self.success.labels(reason).inc()
        self.prompt_len.observe(prompt_tokens)
        self.generation_len.observe(completion_tokens)
        if queue_s is not None:
            self.queue.observe(queue_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if e2e_s is not None:
            self.e2e.observe(e2e_s)
        for gap in itl_s:
            self.itl.observe(gap)

    def rejected(self, reason: str) -> None:
        """reason: queue_full | rate_limited | timeout | circuit_open | auth (others count as "other")."""
        self.rejections.labels(reason if reason in REJECT_REASONS else "other").inc()

    def response_cache(self, hit: bool) -> None:
        self.cache_requests.labels("hit" if hit else "miss").inc()

    def observe_http(self, method: str, route: str, status: int, duration_s: float) -> None:
        """One HTTP request; `route` must be a template (or a fixed placeholder), never a raw path."""
        method = method if method in HTTP_METHODS else "OTHER"
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_latency.labels(method, route).observe(duration_s)

    def http_started(self) -> Callable[[], None]:
        """Count one request in progress (its route is not known yet); returns the call that ends it."""
        self.http_in_progress.inc()
        return self.http_in_progress.dec

    # --- exposition ----------------------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """The text exposition of every metric, and its content type."""
        if self.multiprocess:
            # NOTE: the answering worker's state is fresh, the others' at most one interval old
            self.sample()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
