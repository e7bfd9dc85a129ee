"""End to end: a real server process (real default model, JSON logs) scraped by a real Prometheus on
loopback; the official `openai` client drives it. A second test runs two Uvicorn workers in
multiprocess mode and checks every scrape sums both."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.monitoring import MONITORING, AppServer, PrometheusServer, require_tool

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_prometheus_scrapes_the_app_and_logs_are_json(tmp_path: Path) -> None:
    require_tool("prometheus")
    marker = f"zebra-{uuid.uuid4().hex[:8]}"
    with AppServer(tmp_path / "app", DS_LOG_FORMAT="json") as app:
        client = openai.OpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(
            model=MODEL,
            max_tokens=6,
            temperature=0,
            extra_headers={"X-Request-ID": "mon-req-1"},
            messages=[{"role": "user", "content": f"Say hello to {marker}."}],
        )
        assert answer.usage is not None
        stream = client.chat.completions.create(
            model=MODEL, max_tokens=4, temperature=0, stream=True, messages=[{"role": "user", "content": "Hi"}]
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) is not None

        rule_files = ", ".join(f'"{p}"' for p in sorted((MONITORING / "rules").glob("*.yml")))
        config = f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: [{rule_files}]
scrape_configs:
  - job_name: deepseek-serve
    static_configs: [{{targets: ["127.0.0.1:{app.port}"]}}]
"""
        with PrometheusServer(tmp_path / "prometheus", config) as prom:
            direct = scrape(app.url)[("llm_generation_tokens_total", ())]
            assert direct >= answer.usage.completion_tokens
            deadline = time.monotonic() + 30
            result: list[dict[str, object]] = []
            while time.monotonic() < deadline:
                result = prom.query('llm_generation_tokens_total{job="deepseek-serve"}')
                if result:
                    break
                time.sleep(0.5)
            assert result, "Prometheus never stored llm_generation_tokens_total"
            assert float(result[0]["value"][1]) == direct  # type: ignore[index]
            assert float(prom.query('up{job="deepseek-serve"}')[0]["value"][1]) == 1
            chat = prom.query('ds_http_requests_total{route="/v1/chat/completions", status="200"}')
            assert float(chat[0]["value"][1]) == 2
            groups = httpx.get(f"{prom.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
            loaded = {r["name"]: r for g in groups for r in g["rules"]}
            assert "DeepseekServeDown" in loaded and "HostDiskSpaceLow" in loaded
            assert loaded["DeepseekServeDown"]["health"] == "ok"
            assert loaded["DeepseekServeDown"]["state"] == "inactive"
        logs = app.stderr()

    lines = [json.loads(line) for line in logs.splitlines() if line.strip()]  # every line is JSON
    assert marker not in logs  # no prompt text by default
    access = [e for e in lines if e["logger"] == "uvicorn.access" and e.get("request_id") == "mon-req-1"]
    assert len(access) == 1
    assert access[0]["route"] == "/v1/chat/completions" and access[0]["status"] == 200
    assert access[0]["latency_ms"] > 0 and "time" in access[0] and access[0]["level"] == "info"
    assert access[0]["completion_id"] == answer.id  # engine lines name `<completion id>-<choice>`
    finished = [e for e in lines if e.get("request_id") == "mon-req-1" and "tokens" in e]
    assert finished and finished[0]["tokens"] == answer.usage.total_tokens


def test_two_workers_share_one_view_of_the_metrics(tmp_path: Path) -> None:
    with AppServer(tmp_path / "app", workers=2) as app:
        mp_dir = tmp_path / "app" / "prometheus-multiproc"
        client = openai.OpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0)
        completion_tokens = 0
        for i in range(6):
            answer = client.completions.create(model=MODEL, prompt=f"Number {i}:", max_tokens=2, temperature=0)
            assert answer.usage is not None
            completion_tokens += answer.usage.completion_tokens
        time.sleep(1.5)  # one sampler interval: engine counters reach the shared files
        views = [scrape(app.url) for _ in range(6)]  # answered by either worker
        assert any(mp_dir.glob("*.db")), "workers did not write multiprocess files"
        for got in views:
            assert (
                got[("ds_http_requests_total", (("method", "POST"), ("route", "/v1/completions"), ("status", "200")))]
                == 6
            )
            assert (
                got[("llm_request_success_total", (("finish_reason", "length"),))]
                + got.get(("llm_request_success_total", (("finish_reason", "stop"),)), 0)
                == 6
            )
            # >= because /health/ready may have run a one-token probe in each worker at start
            assert got[("llm_generation_tokens_total", ())] >= completion_tokens
            assert got[("llm_generation_tokens_total", ())] == views[0][("llm_generation_tokens_total", ())]
            assert got[("llm_max_batch_size", ())] == 2 * 4  # DS_MAX_BATCH_SIZE=4 in each worker
            assert got[("ds_engine_ready", ())] == 1
            assert got[("process_resident_memory_bytes", ())] > 100e6  # two workers holding the model
