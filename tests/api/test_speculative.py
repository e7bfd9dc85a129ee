"""Speculative decoding through a real `deepseek-serve serve` process (prompt lookup on the test model),
driven by the official `openai` SDK: the usage extension, the per-request opt-out and the Prometheus
counters per guesser."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.server import ServeProcess

COPY = (
    "Repeat this list exactly, one item per line:\n"
    "apples, pears, plums, cherries, grapes, lemons, limes, oranges, melons, peaches,\n"
    "apples, pears, plums, cherries, grapes, lemons, limes, oranges, melons, peaches"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    srv = ServeProcess(
        tmp_path_factory.mktemp("spec-srv"),
        DS_SPECULATIVE="ngram",
        DS_SPECULATIVE_MAX_BATCH="4",
        DS_SPECULATIVE_ADAPTIVE="false",  # guesses every step, whatever this machine's costs
        # runs compared token for token share one KV layout: no prefix-cache hits (see test_engine.py, NEAR_TIE)
        DS_PREFIX_CACHE="false",
        DS_RESPONSE_CACHE="false",
        DS_REDIS_URL="",
        DS_LOG_LEVEL="warning",
        DS_AUTH="off",
    )
    srv.start()
    yield srv
    srv.stop()


def _client(server: ServeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def _model(server: ServeProcess) -> str:
    return str(httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"])


def _speculative(usage: object) -> dict[str, int] | None:
    extra = getattr(usage, "model_extra", None) or {}
    value = extra.get("speculative_tokens")
    return dict(value) if value is not None else None


def test_usage_reports_speculation_and_a_request_may_opt_out(server: ServeProcess) -> None:
    client, model = _client(server), _model(server)
    messages = [{"role": "user", "content": COPY}]
    spec = client.chat.completions.create(model=model, messages=messages, max_tokens=48, temperature=0)  # type: ignore[arg-type]
    counts = _speculative(spec.usage)
    assert counts is not None and counts["drafted"] >= counts["accepted"] > 0
    plain = client.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=48,
        temperature=0,
        extra_body={"speculative": False},
    )
    assert _speculative(plain.usage) is None
    assert plain.choices[0].message.content == spec.choices[0].message.content
    assert plain.usage is not None and spec.usage is not None
    assert plain.usage.completion_tokens == spec.usage.completion_tokens
    # null means "not set", as for the other optional fields
    default = client.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=8,
        temperature=0,
        extra_body={"speculative": None},
    )
    assert _speculative(default.usage) is not None
    bad = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": model, "messages": messages, "max_tokens": 4, "speculative": "sometimes"},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "speculative"


def test_streamed_usage_and_metrics_per_guesser(server: ServeProcess) -> None:
    client, model = _client(server), _model(server)
    itl_before = _sample(httpx.get(f"{server.url}/metrics").text, "llm_inter_token_latency_seconds_count")
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": COPY}],
        max_tokens=48,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert text and usage is not None and usage.completion_tokens > 0
    counts = _speculative(usage)
    assert counts is not None and counts["accepted"] > 0
    metrics = httpx.get(f"{server.url}/metrics").text
    drafted = _sample(metrics, 'llm_speculative_drafted_tokens_total{guesser="ngram"}')
    accepted = _sample(metrics, 'llm_speculative_accepted_tokens_total{guesser="ngram"}')
    assert drafted >= accepted >= counts["accepted"] > 0
    # one inter-token latency per token after the first, though a delta carries several tokens
    itl = _sample(metrics, "llm_inter_token_latency_seconds_count") - itl_before
    assert itl == usage.completion_tokens - 1


def _sample(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in /metrics")


def test_a_draft_setting_without_a_draft_model_is_refused_at_start(tmp_path: Path) -> None:
    srv = ServeProcess(tmp_path, DS_SPECULATIVE="draft", timeout_s=60)
    with pytest.raises(RuntimeError, match="DS_DRAFT_MODEL"):
        srv.start()
    srv.stop()
