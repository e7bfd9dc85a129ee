"""Metrics: the `Metrics` hooks, state reported by the real engine, Redis breaker, database pool and
usage writer, multiprocess mode across real processes, and `/metrics` served by the real app (in
process, real model)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from deepseek_serve.api.app import create_app
from deepseek_serve.cache import build_cache_layer
from deepseek_serve.config import Settings
from deepseek_serve.contracts import CacheState
from deepseek_serve.engine.async_engine import AsyncEngine
from deepseek_serve.engine.types import EngineStats, GenerationRequest, SamplingParams
from deepseek_serve.observability.metrics import (
    MULTIPROC_ENV,
    PrometheusMetrics,
    cache_state,
    engine_state,
    prepare_multiprocess_dir,
    storage_state,
)
from deepseek_serve.storage.runtime import Storage
from tests.support.settings import make_settings
from tests.support.storage import mariadb


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: PrometheusMetrics, name: str, **labels: str) -> float:
    got = metrics.registry.get_sample_value(name, labels)
    assert got is not None, f"{name}{labels} not exposed"
    return got


# --- hooks -------------------------------------------------------------------------------------------
def test_observe_request_records_every_timing_and_the_finish_reason() -> None:
    m = PrometheusMetrics(process_metrics=False)
    m.observe_request(
        endpoint="chat.completions",
        finish_reason="length",
        prompt_tokens=40,
        completion_tokens=4,
        cached_tokens=8,
        queue_s=0.002,
        ttft_s=0.3,
        e2e_s=1.2,
        itl_s=[0.01, 0.03, 0.2],
    )
    m.observe_request(
        endpoint="completions",
        finish_reason="something-new",
        prompt_tokens=5,
        completion_tokens=0,
        cached_tokens=0,
        queue_s=None,
        ttft_s=None,
        e2e_s=0.05,
        itl_s=[],
    )
    assert value(m, "llm_request_success_total", finish_reason="length") == 1
    assert value(m, "llm_request_success_total", finish_reason="other") == 1  # bounded label
    assert value(m, "llm_request_success_total", finish_reason="stop") == 0
    assert value(m, "llm_time_to_first_token_seconds_count") == 1
    assert value(m, "llm_time_to_first_token_seconds_bucket", le="0.25") == 0
    assert value(m, "llm_time_to_first_token_seconds_bucket", le="0.5") == 1
    assert value(m, "llm_inter_token_latency_seconds_count") == 3
    assert value(m, "llm_inter_token_latency_seconds_bucket", le="0.04") == 2
    assert value(m, "llm_e2e_request_latency_seconds_count") == 2
    assert value(m, "llm_request_queue_time_seconds_count") == 1
    assert value(m, "llm_request_prompt_tokens_sum") == 45
    assert value(m, "llm_request_generation_tokens_sum") == 4


def test_rejections_and_response_cache_lookups_are_counted_by_bounded_reason() -> None:
    m = PrometheusMetrics(process_metrics=False)
    for reason in ("queue_full", "queue_full", "rate_limited", "auth", "sk-not-a-reason"):
        m.rejected(reason)
    m.response_cache(True)
    m.response_cache(False)
    m.response_cache(False)
    assert value(m, "llm_requests_rejected_total", reason="queue_full") == 2
    assert value(m, "llm_requests_rejected_total", reason="rate_limited") == 1
    assert value(m, "llm_requests_rejected_total", reason="timeout") == 0  # present before the first event
    assert value(m, "llm_requests_rejected_total", reason="other") == 1
    assert "sk-not-a-reason" not in m.render()[0].decode()
    assert value(m, "ds_response_cache_requests_total", result="hit") == 1
    assert value(m, "ds_response_cache_requests_total", result="miss") == 2


def test_engine_state_reports_a_stalled_engine_not_ready() -> None:
    now = time.monotonic()
    base = dict(
        num_running=2,
        num_waiting=3,
        max_batch_size=8,
        max_queue_size=64,
        kv_capacity_tokens=1000,
        kv_used_tokens=250,
        steps_total=10,
        prompt_tokens_total=100,
        generation_tokens_total=50,
        prefix_cache_queries_tokens_total=90,
        prefix_cache_hits_tokens_total=30,
        is_running=True,
    )
    busy_stalled = {
        m.name: m.value for m in engine_state(EngineStats(last_step_monotonic=now - 120, **base), True, now)
    }
    assert busy_stalled["ds_engine_ready"] == 0
    assert busy_stalled["llm_kv_cache_usage_ratio"] == 0.25
    assert busy_stalled["llm_requests_waiting"] == 3
    idle = {**base, "num_running": 0, "num_waiting": 0}
    idle_long = {m.name: m.value for m in engine_state(EngineStats(last_step_monotonic=now - 3600, **idle), True, now)}
    assert idle_long["ds_engine_ready"] == 1
    draining = {m.name: m.value for m in engine_state(EngineStats(last_step_monotonic=now, **base), False, now)}
    assert draining["ds_engine_ready"] == 0


# --- state reported by the real engine, Redis breaker, database pool and usage writer -----------------
async def test_engine_gauges_and_token_counters_follow_the_real_engine(engine: AsyncEngine) -> None:
    m = PrometheusMetrics(process_metrics=False)
    m.attach(engine)
    before = samples(m.render()[0].decode())
    assert before[("llm_max_batch_size", ())] == engine.stats().max_batch_size
    assert before[("llm_kv_cache_capacity_tokens", ())] > 0
    assert before[("ds_engine_ready", ())] == 1
    request = GenerationRequest(
        request_id=f"mon-{uuid.uuid4().hex}",
        prompt="The capital of France is",
        params=SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),
    )
    _, last = await engine.complete(request)
    assert last.usage is not None
    after = samples(m.render()[0].decode())
    assert after[("llm_generation_tokens_total", ())] - before[("llm_generation_tokens_total", ())] == 5
    # every prompt token counts, prefix-cache hits included (an earlier test may have left this prompt cached)
    assert after[("llm_prompt_tokens_total", ())] - before[("llm_prompt_tokens_total", ())] == last.usage.prompt_tokens
    assert (
        after[("llm_prefix_cache_hits_total", ())] - before[("llm_prefix_cache_hits_total", ())]
        == last.usage.cached_tokens
    )
    assert after[("llm_engine_steps_total", ())] > before[("llm_engine_steps_total", ())]
    assert after[("llm_requests_running", ())] == 0


def test_the_engine_reports_its_stats_and_whether_it_accepts_work(engine: AsyncEngine) -> None:
    state = engine.metrics_snapshot()
    assert state.accepting and state.stats.is_running
    assert state.stats.max_batch_size == engine.stats().max_batch_size
    assert state.stats.kv_capacity_tokens > 0


def test_redis_breaker_state_is_exported_from_the_cache_layer(settings: Settings) -> None:
    # a closed port: the real RedisClient's breaker, driven through its own protocol
    redis_settings = make_settings(
        settings.data_dir, redis_url="redis://127.0.0.1:1/0", breaker_failure_threshold=2, breaker_reset_s=60
    )
    layer = build_cache_layer(redis_settings)
    assert {m.name: m.value for m in cache_state(layer.metrics_snapshot())} == {"ds_redis_circuit_state": 0}
    assert layer.breaker is not None
    layer.breaker.record_failure("refused")
    layer.breaker.record_failure("refused")
    assert {m.name: m.value for m in cache_state(layer.metrics_snapshot())}["ds_redis_circuit_state"] == 2
    no_redis = build_cache_layer(settings)
    assert no_redis.metrics_snapshot() == CacheState(redis_circuit_state=None)
    assert cache_state(no_redis.metrics_snapshot()) == []


async def test_database_pool_usage_is_read_from_the_real_pool(settings: Settings) -> None:
    from sqlalchemy import text

    db_settings = make_settings(
        settings.data_dir, database_url=mariadb().url("test"), db_pool_size=3, db_max_overflow=2
    )
    storage = Storage(db_settings)
    try:
        async with storage.engine.connect() as c1, storage.engine.connect() as c2:
            await c1.execute(text("SELECT 1"))
            await c2.execute(text("SELECT 1"))
            state = {m.name: m.value for m in storage_state(storage.metrics_snapshot())}
            assert state["ds_db_pool_in_use"] == 2
            assert state["ds_db_pool_size"] == 3
            assert state["ds_db_pool_max_overflow"] == 2
            assert state["ds_db_pool_overflow"] == 0
        assert {m.name: m.value for m in storage_state(storage.metrics_snapshot())}["ds_db_pool_in_use"] == 0
    finally:
        await storage.engine.dispose()


def test_storage_state_of_the_default_sqlite_store(settings: Settings) -> None:
    """The embedded SQLite store keeps SQLAlchemy's pool defaults (5 connections, overflow 10)."""
    storage = Storage(settings)
    state = {m.name: m.value for m in storage_state(storage.metrics_snapshot())}
    assert (state["ds_db_pool_size"], state["ds_db_pool_max_overflow"], state["ds_db_pool_in_use"]) == (5, 10, 0)
    assert storage.engine.sync_engine.pool._max_overflow == 10  # type: ignore[attr-defined]  # SQLAlchemy's own
    assert state["ds_usage_spool_backlog"] == state["ds_usage_queue_depth"] == 0
    assert state["ds_usage_database_reachable"] == 1
    assert state["ds_usage_records_written"] == 0


def test_a_component_that_fails_to_report_adds_no_metric() -> None:
    class Broken:
        def metrics_snapshot(self) -> CacheState:
            raise RuntimeError("gone")

    class Open:
        def metrics_snapshot(self) -> CacheState:
            return CacheState(redis_circuit_state=2)

    m = PrometheusMetrics(process_metrics=False)
    m.attach(None, cache=Broken())
    assert "ds_redis_circuit_state" not in m.render()[0].decode()
    m.attach(None, cache=Open())
    assert value(m, "ds_redis_circuit_state") == 2


def test_prepare_multiprocess_dir_clears_old_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    stale = tmp_path / "prometheus-multiproc" / "counter_12345.db"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    path = prepare_multiprocess_dir(tmp_path)
    assert os.environ[MULTIPROC_ENV] == str(path)
    assert path.is_dir() and list(path.iterdir()) == []


# --- multiprocess mode, across real processes -----------------------------------------------------------
# One worker: records 50 requests and reports engine and cache state, says "ready", then ends as
# told on stdin: "close" (a clean shutdown) or "crash" (no close()). argv: seed, Redis breaker state.
_WORKER = """
import sys
from deepseek_serve.contracts import CacheState
from deepseek_serve.engine.types import EngineState, EngineStats
from deepseek_serve.observability.metrics import PrometheusMetrics

seed, circuit = int(sys.argv[1]), int(sys.argv[2])

class Engine:
    def metrics_snapshot(self):
        stats = EngineStats(num_running=seed, num_waiting=0, max_batch_size=8, max_queue_size=64,
                            kv_capacity_tokens=100, kv_used_tokens=10 * seed, last_step_monotonic=0.0,
                            steps_total=seed, prompt_tokens_total=0, generation_tokens_total=100 * seed,
                            prefix_cache_queries_tokens_total=0, prefix_cache_hits_tokens_total=0, is_running=True)
        return EngineState(stats=stats, accepting=True)

class Cache:
    def metrics_snapshot(self):
        return CacheState(redis_circuit_state=circuit)

m = PrometheusMetrics(sample_interval_s=3600.0)
assert m.multiprocess
m.attach(Engine(), cache=Cache())
for i in range(50):
    m.observe_request(endpoint="completions", finish_reason=("stop", "length")[i % 2], prompt_tokens=i,
                      completion_tokens=seed + i, cached_tokens=0, queue_s=i / 100, ttft_s=i / 10,
                      e2e_s=i / 5, itl_s=[0.01 * seed, 0.02])
    m.observe_http("POST", "/v1/completions", (200, 429)[i % 3 == 0], i / 50)
m.rejected("queue_full")
print("ready", flush=True)
if sys.stdin.readline().strip() == "close":
    m.close()
"""

# A scrape by another worker; argv: "attach" (as a starting worker does) or "plain".
_SCRAPER = """
import sys
from deepseek_serve.observability.metrics import PrometheusMetrics

m = PrometheusMetrics(sample_interval_s=3600.0)
if sys.argv[1] == "attach":
    m.attach(None)
sys.stdout.write(m.render()[0].decode())
"""


def test_multiprocess_metrics_sum_the_workers_of_real_processes(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, MULTIPROC_ENV: str(tmp_path)}

    def scrape(how: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        done = subprocess.run(
            [sys.executable, "-c", _SCRAPER, how], env=env, check=True, timeout=120, capture_output=True, text=True
        )
        return samples(done.stdout)

    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, seed, circuit],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed, circuit in (("1", "2"), ("2", "1"))
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
        both = scrape("attach")  # both alive: nothing of theirs is dropped
        assert both[("llm_request_success_total", (("finish_reason", "stop"),))] == 50
        assert both[("llm_request_success_total", (("finish_reason", "length"),))] == 50
        assert both[("llm_requests_rejected_total", (("reason", "queue_full"),))] == 2
        assert both[("llm_inter_token_latency_seconds_count", ())] == 200
        assert both[("llm_inter_token_latency_seconds_bucket", (("le", "0.01"),))] == 50  # worker 1's 0.01 gaps
        assert both[("llm_request_generation_tokens_sum", ())] == sum(range(50)) * 2 + 50 * 3
        http_429 = ("ds_http_requests_total", (("method", "POST"), ("route", "/v1/completions"), ("status", "429")))
        assert both[http_429] == 34
        # state: counters and livesum gauges add up, livemax takes the largest
        assert both[("llm_generation_tokens_total", ())] == 300
        assert both[("llm_engine_steps_total", ())] == 3
        assert both[("llm_requests_running", ())] == 3
        assert both[("llm_max_batch_size", ())] == 16
        assert both[("llm_kv_cache_usage_ratio", ())] == 0.2
        assert both[("ds_redis_circuit_state", ())] == 2

        workers[1].communicate("close\n", timeout=60)  # worker 2 shuts down cleanly
        workers[0].communicate("crash\n", timeout=60)  # worker 1 ends without close()
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    # the closed worker's gauges left with it; the crashed worker's are still there
    ended = scrape("plain")
    assert ended[("llm_requests_running", ())] == 1
    assert ended[("ds_redis_circuit_state", ())] == 2
    assert ended[("llm_generation_tokens_total", ())] == 300  # counters stay: they are still true
    # a starting worker drops the gauges of workers that are gone; counters stay
    restarted = scrape("attach")
    assert ("ds_redis_circuit_state", ()) not in restarted
    assert ("llm_requests_running", ()) not in restarted
    assert restarted[("llm_generation_tokens_total", ())] == 300
    assert restarted[("llm_request_success_total", (("finish_reason", "stop"),))] == 50
    assert restarted[("process_resident_memory_bytes", ())] > 0


# --- /metrics served by the real app ----------------------------------------------------------------------
@pytest_asyncio.fixture(loop_scope="session")
async def client(engine: AsyncEngine, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_settings(tmp_path, metrics_token=""), engine)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c,
    ):
        yield c


async def test_metrics_endpoint_serves_the_text_format(client: httpx.AsyncClient) -> None:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    got = samples(response.text)
    assert ("llm_requests_running", ()) in got
    assert ("llm_kv_cache_usage_ratio", ()) in got
    assert ("process_resident_memory_bytes", ()) in got


async def test_http_metrics_use_route_templates_never_raw_paths(client: httpx.AsyncClient) -> None:
    await client.get("/v1/models/secret-model-7f3a")
    await client.get("/no/such/path/sk-abcdef1234567890?api_key=sk-zzz")
    await client.post("/v1/chat/completions", json={"model": "nope", "messages": []})
    text = (await client.get("/metrics")).text
    got = samples(text)
    assert (
        got[("ds_http_requests_total", (("method", "GET"), ("route", "/v1/models/{model_id}"), ("status", "404")))] == 1
    )
    assert got[("ds_http_requests_total", (("method", "GET"), ("route", "<unmatched>"), ("status", "404")))] == 1
    assert (
        got[("ds_http_requests_total", (("method", "POST"), ("route", "/v1/chat/completions"), ("status", "400")))] == 1
    )
    for leaked in ("secret-model-7f3a", "sk-abcdef", "sk-zzz", "/no/such"):
        assert leaked not in text


async def test_a_completion_moves_request_metrics(client: httpx.AsyncClient) -> None:
    before = samples((await client.get("/metrics")).text)
    response = await client.post(
        "/v1/chat/completions",
        json={
            "model": "SmolLM2-135M-Instruct",
            "max_tokens": 4,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Count to ten."}],
        },
    )
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    after = samples((await client.get("/metrics")).text)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    finish_reason = response.json()["choices"][0]["finish_reason"]
    assert delta("llm_request_success_total", finish_reason=finish_reason) == 1
    assert delta("llm_time_to_first_token_seconds_count") == 1
    assert delta("llm_e2e_request_latency_seconds_count") == 1
    assert delta("llm_generation_tokens_total") == usage["completion_tokens"]
    assert delta("llm_request_generation_tokens_sum") == usage["completion_tokens"]
    assert delta("ds_http_requests_total", method="POST", route="/v1/chat/completions", status="200") == 1


async def test_metrics_token_protects_the_endpoint(engine: AsyncEngine, tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, metrics_token="scrape-token-5b1e"), engine)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c,
    ):
        missing = await c.get("/metrics")
        wrong = await c.get("/metrics", headers={"Authorization": "Bearer scrape-token-xxxx"})
        right = await c.get("/metrics", headers={"Authorization": "Bearer scrape-token-5b1e"})
    for refused in (missing, wrong):
        assert refused.status_code == 401
        error = refused.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "authentication_error"
        assert "llm_" not in refused.text
    assert right.status_code == 200
    assert "llm_requests_running" in right.text


async def test_refused_api_keys_count_as_auth_rejections(engine: AsyncEngine, tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, auth="on"), engine)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c,
    ):
        body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}]}
        missing = await c.post("/v1/chat/completions", json=body)
        wrong = await c.post(
            "/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-wrong-key-000000000000000000"}
        )
        text = (await c.get("/metrics")).text
    assert missing.status_code == wrong.status_code == 401
    assert samples(text)[("llm_requests_rejected_total", (("reason", "auth"),))] == 2
    assert "sk-wrong" not in text
