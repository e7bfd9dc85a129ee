"""Prometheus metrics: the `Metrics` hooks the API calls, plus the state the engine, the storage layer
and the cache layer report through their `metrics_snapshot()` methods.

Two modes, picked when `PrometheusMetrics` is built:

- one process (no `PROMETHEUS_MULTIPROC_DIR`): a private registry; state is read at scrape time by
  `StateCollector`, so nothing runs between scrapes.
- several Uvicorn workers: prometheus_client's multiprocess mode. `PROMETHEUS_MULTIPROC_DIR` is set
  before prometheus_client is imported (`prepare_multiprocess_dir`, called by the serve command), so
  every metric writes to this worker's files in that folder; a sampler thread copies state into
  gauges and counters every `sample_interval_s`; a scrape of any worker merges all workers' files
  (`MultiProcessCollector`); `close()` calls `mark_process_dead`, which drops this worker's live gauges.

Labels are bounded: finish reasons, rejection reasons, HTTP method, route template and status.
Never a key, a raw path or user text.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from deepseek_serve.contracts import CacheState, StateReporter, StorageState
from deepseek_serve.engine.types import EngineState, EngineStats

logger = logging.getLogger(__name__)

T = TypeVar("T")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

FINISH_REASONS = frozenset({"stop", "length", "abort", "timeout", "error", "cached"})
REJECT_REASONS = frozenset({"queue_full", "rate_limited", "timeout", "auth"})
HTTP_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})

# Seconds; chosen for a CPU-served small model (ms per token) up to long GPU generations.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
HTTP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

# As /health/ready: an engine with work whose last step is older than this is not ready.
STALL_AFTER_S = 30.0


# --- state reported by the components ---------------------------------------------------------------
GaugeMode = Literal["livesum", "livemax", "livemin"]


@dataclass(frozen=True)
class StateMetric:
    """One value of process state. `mp_mode` says how workers combine in multiprocess mode."""

    name: str
    documentation: str
    kind: Literal["gauge", "counter"]
    value: float
    mp_mode: GaugeMode = "livesum"
    labels: tuple[tuple[str, str], ...] = ()  # (label, value); one name keeps the same label names


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
        *speculative_state(stats),
    ]


def speculative_state(stats: EngineStats) -> list[StateMetric]:
    """Speculative decoding's counters per guesser (none while it is off); the acceptance rate is
    accepted / drafted (e.g. `rate(llm_speculative_accepted_tokens_total[5m]) / rate(..drafted..)`)."""
    out: list[StateMetric] = []
    for guesser, drafted, accepted in stats.speculative:
        labels = (("guesser", guesser),)
        out.append(
            StateMetric(
                "llm_speculative_drafted_tokens",
                "Tokens guessed by speculative decoding and verified by the model.",
                "counter",
                drafted,
                labels=labels,
            )
        )
        out.append(
            StateMetric(
                "llm_speculative_accepted_tokens",
                "Guessed tokens the model kept.",
                "counter",
                accepted,
                labels=labels,
            )
        )
    return out


def storage_state(state: StorageState) -> list[StateMetric]:
    """Database pool gauges (when the pool counts connections) and the usage writer's state."""
    out: list[StateMetric] = []
    pool = state.pool
    if pool is not None:
        out += [
            StateMetric(
                "ds_db_pool_size", "Database connections the pool keeps (DS_DB_POOL_SIZE).", "gauge", pool.size
            ),
            StateMetric("ds_db_pool_in_use", "Database connections checked out now.", "gauge", pool.in_use),
            StateMetric("ds_db_pool_overflow", "Connections open beyond the pool size now.", "gauge", pool.overflow),
            StateMetric(
                "ds_db_pool_max_overflow", "Allowed overflow (DS_DB_MAX_OVERFLOW).", "gauge", pool.max_overflow
            ),
        ]
    usage = state.usage
    out += [
        StateMetric(
            "ds_usage_spool_backlog",
            "Usage records spooled on disk, waiting for the database.",
            "gauge",
            usage.spool_backlog,
            "livemax",
        ),
        StateMetric(
            "ds_usage_queue_depth", "Usage records in memory, queued or being written.", "gauge", usage.queue_depth
        ),
        StateMetric(
            "ds_usage_database_reachable",
            "1 while usage records reach the database.",
            "gauge",
            1.0 if usage.database_reachable else 0.0,
            "livemin",
        ),
        StateMetric("ds_usage_records_written", "Usage records written.", "counter", usage.written_total),
        StateMetric("ds_usage_records_spooled", "Usage records sent to the spool.", "counter", usage.spooled_total),
        StateMetric(
            "ds_usage_records_rejected", "Usage records the database refused.", "counter", usage.rejected_total
        ),
    ]
    return out


def cache_state(state: CacheState) -> list[StateMetric]:
    """The Redis breaker gauge; nothing without Redis."""
    if state.redis_circuit_state is None:
        return []
    return [
        StateMetric(
            "ds_redis_circuit_state",
            "Redis circuit breaker: 0 closed, 1 half-open, 2 open (fallbacks in use).",
            "gauge",
            state.redis_circuit_state,
            "livemax",
        )
    ]


class StateCollector(Collector):
    """Scrape-time collector (one-process mode): component state as metric families."""

    def __init__(self, read: Callable[[], list[StateMetric]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for m in self._read():
            family = families.get(m.name)
            if family is None:
                names = [label for label, _ in m.labels]
                kind = GaugeMetricFamily if m.kind == "gauge" else CounterMetricFamily
                family = families[m.name] = kind(m.name, m.documentation, labels=names)
            family.add_metric([value for _, value in m.labels], m.value)
        yield from families.values()


class _Mirror:
    """Multiprocess mode: copies state into this worker's metrics (and so into its files)."""

    def __init__(self) -> None:
        self._gauges: dict[str, Gauge] = {}
        self._counters: dict[str, Counter] = {}
        self._last: dict[str, float] = {}

    def update(self, metrics: list[StateMetric]) -> None:
        for m in metrics:
            names = [label for label, _ in m.labels]
            values = [value for _, value in m.labels]
            if m.kind == "gauge":
                gauge = self._gauges.get(m.name)
                if gauge is None:
                    gauge = self._gauges[m.name] = Gauge(
                        m.name, m.documentation, names, registry=None, multiprocess_mode=m.mp_mode
                    )
                (gauge.labels(*values) if values else gauge).set(m.value)
            else:
                counter = self._counters.get(m.name)
                if counter is None:
                    counter = self._counters[m.name] = Counter(m.name, m.documentation, names, registry=None)
                key = "\0".join([m.name, *values])
                last = self._last.get(key, 0.0)
                # A total that went down comes from a new source (engine rebuilt): count it from zero.
                delta = m.value - last if m.value >= last else m.value
                if delta > 0:
                    (counter.labels(*values) if values else counter).inc(delta)
                self._last[key] = m.value


def _process_state(pid: int) -> list[StateMetric]:
    """RSS, CPU seconds and open files of this process, from /proc (multiprocess mode only: there
    prometheus_client's ProcessCollector cannot sum the workers)."""
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


# --- multiprocess folder -------------------------------------------------------------------------------
def is_multiprocess() -> bool:
    """True when prometheus_client was imported with `PROMETHEUS_MULTIPROC_DIR` set, so metric values
    live in that folder's files."""
    if not os.environ.get(MULTIPROC_ENV):
        return False
    if values.ValueClass is values.MutexValue:
        logger.warning("%s was set after prometheus_client was imported; metrics stay per process", MULTIPROC_ENV)
        return False
    return True


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


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    return True


def forget_dead_workers(path: str) -> list[int]:
    """`mark_process_dead` for every process that left live gauge files in `path` and is gone (a
    worker that crashed and that Uvicorn replaced); returns their pids. Their counters stay."""
    pids = set()
    for file in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        suffix = os.path.basename(file)[: -len(".db")].rsplit("_", 1)[1]
        if suffix.isdigit():
            pids.add(int(suffix))
    dead = sorted(pid for pid in pids if not _is_alive(pid))
    for pid in dead:
        multiprocess.mark_process_dead(pid, path)
    return dead


# --- the Metrics implementation --------------------------------------------------------------------------
class PrometheusMetrics:
    """Implements `contracts.Metrics`; owns the registry `/metrics` renders.

    `attach(engine, storage=..., cache=...)` once the components exist; `close()` at shutdown.
    """

    def __init__(self, *, sample_interval_s: float = 1.0, process_metrics: bool = True) -> None:
        disable_created_metrics()  # process-wide; `*_created` series double the scrape for no alert
        self.multiprocess = is_multiprocess()
        self._sample_interval_s = sample_interval_s
        self._engine: StateReporter[EngineState] | None = None
        self._storage: StateReporter[StorageState] | None = None
        self._cache: StateReporter[CacheState] | None = None
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self._mirror = _Mirror() if self.multiprocess else None
        self._mirror_lock = threading.Lock()
        self._pid = os.getpid()

        self.registry = CollectorRegistry()
        if self.multiprocess:
            multiprocess.MultiProcessCollector(self.registry, path=os.environ[MULTIPROC_ENV])
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
        # Children created up front, so every series reads 0 before the first event.
        for reason in REJECT_REASONS:
            self.rejections.labels(reason)
        for result in ("hit", "miss"):
            self.cache_requests.labels(result)
        for finish in ("stop", "length"):
            self.success.labels(finish)

    # --- wiring --------------------------------------------------------------------------------------
    def attach(
        self,
        engine: StateReporter[EngineState] | None,
        *,
        storage: StateReporter[StorageState] | None = None,
        cache: StateReporter[CacheState] | None = None,
    ) -> None:
        """Read state from the components' `metrics_snapshot()` from now on (a component left None
        adds no metric)."""
        self._engine = engine
        self._storage = storage
        self._cache = cache
        if self.multiprocess and self._sampler is None:
            dead = forget_dead_workers(os.environ[MULTIPROC_ENV])
            if dead:
                logger.info("metrics: dropped the live gauges of workers that are gone: %s", dead)
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
            multiprocess.mark_process_dead(self._pid)

    def _read_state(self) -> list[StateMetric]:
        """Every component's state; one that fails adds nothing (a scrape must not fail with it)."""
        out: list[StateMetric] = []
        if self._engine is not None:
            out += self._read(
                "engine",
                self._engine,
                lambda s: engine_state(s.stats, s.accepting, time.monotonic()) if s.reports else [],
            )
        if self._storage is not None:
            out += self._read("storage", self._storage, storage_state)
        if self._cache is not None:
            out += self._read("cache", self._cache, cache_state)
        return out

    @staticmethod
    def _read(name: str, source: StateReporter[T], to_metrics: Callable[[T], list[StateMetric]]) -> list[StateMetric]:
        try:
            return to_metrics(source.metrics_snapshot())
        except Exception:
            logger.debug("reading the %s state for metrics failed", name, exc_info=True)
            return []

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
            except Exception:  # one bad read must not stop the sampler
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
        """One finished request, engine-served or a response-cache hit (finish reason "cached")."""
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
        """reason: queue_full | rate_limited | timeout | auth (others count as "other")."""
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
            # the answering worker's state is fresh, the others' at most one interval old
            self.sample()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
