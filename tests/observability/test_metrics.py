"""Metrics: the `Metrics` hooks, state read from the real engine, Redis breaker and database pool, and
`/metrics` served by the real app (in process, real model)."""

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
from deepseek_serve.api.services import Services
from deepseek_serve.cache import build_cache_layer
from deepseek_serve.config import Settings
from deepseek_serve.engine.async_engine import AsyncEngine
from deepseek_serve.engine.types import EngineStats, GenerationRequest, SamplingParams
from deepseek_serve.observability.metrics import (
    MULTIPROC_ENV,
    PrometheusMetrics,
    engine_state,
    prepare_multiprocess_dir,
    services_state,
)
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


# --- state read from the real engine, Redis breaker and database pool -----------------------------------
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


def test_redis_breaker_state_is_exported_from_the_cache_layer(settings: Settings) -> None:
    # a closed port: the real RedisClient's breaker, driven through its own protocol.
    redis_settings = make_settings(
        settings.data_dir, redis_url="redis://127.0.0.1:1/0", breaker_failure_threshold=2, breaker_reset_s=60
    )
    layer = build_cache_layer(redis_settings)
    services = Services(settings=redis_settings, engine=None, extras={"cache": layer})  # type: ignore[arg-type]
    state = {m.name: m.value for m in services_state(services)}
    assert state["ds_redis_circuit_state"] == 0
    assert layer.breaker is not None
    layer.breaker.record_failure("refused")
    layer.breaker.record_failure("refused")
    assert {m.name: m.value for m in services_state(services)}["ds_redis_circuit_state"] == 2
    no_redis = Services(settings=settings, engine=None, extras={"cache": build_cache_layer(settings)})  # type: ignore[arg-type]
    assert [m.name for m in services_state(no_redis)] == []


async def test_database_pool_usage_is_read_from_the_real_pool(settings: Settings) -> None:
    from sqlalchemy import text

    from deepseek_serve.storage.db import create_db_engine

    db_settings = make_settings(
        settings.data_dir, database_url=mariadb().url("test"), db_pool_size=3, db_max_overflow=2
    )
    db = create_db_engine(db_settings)
    services = Services(settings=db_settings, engine=None, extras={"db": db})  # type: ignore[arg-type]
    try:
        async with db.connect() as c1, db.connect() as c2:
            await c1.execute(text("SELECT 1"))
            await c2.execute(text("SELECT 1"))
            state = {m.name: m.value for m in services_state(services)}
            assert state["ds_db_pool_in_use"] == 2
            assert state["ds_db_pool_size"] == 3
            assert state["ds_db_pool_max_overflow"] == 2
            assert state["ds_db_pool_overflow"] == 0
        assert {m.name: m.value for m in services_state(services)}["ds_db_pool_in_use"] == 0
    finally:
        await db.dispose()


def test_prepare_multiprocess_dir_clears_old_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    stale = tmp_path / "prometheus-multiproc" / "counter_12345.db"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    path = prepare_multiprocess_dir(tmp_path)
    assert os.environ[MULTIPROC_ENV] == str(path)
    assert path.is_dir() and list(path.iterdir()) == []


_WORKER = """
import sys
from prometheus_client import Gauge
from deepseek_serve.observability.metrics import PrometheusMetrics

m = PrometheusMetrics()
seed = int(sys.argv[1])
for i in range(50):
    m.observe_request(endpoint="completions", finish_reason=("stop", "length")[i % 2], prompt_tokens=i,
                      completion_tokens=seed + i, cached_tokens=0, queue_s=i / 100, ttft_s=i / 10,
                      e2e_s=i / 5, itl_s=[0.01 * seed, 0.02])
    m.observe_http("POST", "/v1/completions", (200, 429)[i % 3 == 0], i / 50)
m.rejected("queue_full")
for mode in ("all", "liveall", "mostrecent", "min", "max", "livesum"):
    Gauge(f"extra_{mode}", "x", ["k"], registry=None, multiprocess_mode=mode).labels("a").set(seed * 10 + 1)
"""


def test_multiprocess_aggregation_equals_prometheus_client(tmp_path: Path) -> None:
    import subprocess
    import sys

    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    from deepseek_serve.observability.metrics import MultiProcessFilesCollector

    env = {**os.environ, MULTIPROC_ENV: str(tmp_path)}
    for seed in (1, 2, 3):  # three worker processes writing their own files
        subprocess.run([sys.executable, "-c", _WORKER, str(seed)], env=env, check=True, timeout=60)
    reference, ours = CollectorRegistry(), CollectorRegistry()
    MultiProcessCollector(reference, path=str(tmp_path))
    ours.register(MultiProcessFilesCollector(str(tmp_path)))
    expected = samples(generate_latest(reference).decode())
    got = samples(generate_latest(ours).decode())
    assert got == expected
    assert got[("llm_request_success_total", (("finish_reason", "stop"),))] == 75
    assert got[("llm_inter_token_latency_seconds_count", ())] == 300
    assert got[("extra_max", (("k", "a"),))] == 31
    assert len([k for k in got if k[0] == "extra_all"]) == 3  # one series per worker pid


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
