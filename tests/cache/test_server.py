"""The cache layer behind real `deepseek-serve serve` processes, called with the official `openai` client:
cache hits (JSON and SSE), rate-limit headers and 429s, one budget shared by two processes, and a
Redis server killed and restarted during a run of 50 requests.

The Redis that is killed is a private redis-server on a free port, never the shared one on 6379.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from tests.support.cache import CacheAppServer, PrivateRedis, delete_prefix, redis_url, unique_prefix

pytestmark = pytest.mark.slow

RESET_S = 1.0


@pytest.fixture(scope="module")
def private_redis_server() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, private_redis_server: PrivateRedis) -> Iterator[CacheAppServer]:
    with CacheAppServer(
        tmp_path_factory.mktemp("cache-app"),
        DS_REDIS_URL=private_redis_server.url,
        DS_REDIS_KEY_PREFIX=unique_prefix(),
        DS_REDIS_TIMEOUT_S="0.2",
        DS_BREAKER_FAILURE_THRESHOLD="2",
        DS_BREAKER_RESET_S=str(RESET_S),
        DS_DEFAULT_RPM="10000",
        DS_DEFAULT_TPM="10000000",
    ) as server:
        yield server


def client_for(server: CacheAppServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def model_of(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def ask(
    client: openai.OpenAI, model: str, text: str, max_tokens: int = 6, **extra: object
) -> tuple[httpx.Headers, object]:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}], temperature=0, max_tokens=max_tokens, **extra
    )
    return raw.headers, raw.parse()


def test_repeated_deterministic_request_is_served_from_cache(app: CacheAppServer) -> None:
    client = client_for(app)
    model = model_of(client)
    headers, first = ask(client, model, "Name a colour.")
    assert headers["x-cache"] == "miss"
    assert headers["x-ratelimit-limit-requests"] == "10000"
    assert int(headers["x-ratelimit-remaining-requests"]) < 10000
    assert "x-ratelimit-remaining-tokens" in headers and headers["x-ratelimit-reset-tokens"].endswith("s")
    headers, second = ask(client, model, "Name a colour.")
    assert headers["x-cache"] == "hit"
    assert second.choices[0].message.content == first.choices[0].message.content  # type: ignore[attr-defined]
    assert second.id != first.id  # type: ignore[attr-defined]
    usage = second.usage.model_dump()  # type: ignore[attr-defined]
    assert usage["prompt_tokens"] == first.usage.prompt_tokens > 0  # type: ignore[attr-defined]
    assert usage["completion_tokens"] == first.usage.completion_tokens  # type: ignore[attr-defined]
    assert usage["prompt_cache_hit_tokens"] == usage["prompt_tokens"]
    assert usage["prompt_cache_miss_tokens"] == 0
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"]

    # a streamed request is replayed from the same entry as SSE chunks
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": "Name a colour."}],
        temperature=0,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert raw.headers["x-cache"] == "hit"
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == first.choices[0].message.content  # type: ignore[attr-defined]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == first.choices[0].finish_reason  # type: ignore[attr-defined]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == usage["prompt_tokens"]


def test_streamed_answer_is_cached_for_later_requests(app: CacheAppServer) -> None:
    client = client_for(app)
    model = model_of(client)
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Say a fruit."}], temperature=0, max_tokens=6, stream=True
    )
    assert raw.headers["x-cache"] == "miss"
    streamed = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    headers, hit = ask(client, model, "Say a fruit.")
    assert headers["x-cache"] == "hit"
    assert hit.choices[0].message.content == streamed  # type: ignore[attr-defined]


def test_cache_opt_out_and_nondeterministic_requests_bypass_it(app: CacheAppServer) -> None:
    client = client_for(app)
    model = model_of(client)
    ask(client, model, "Name an animal.")
    headers, _ = ask(client, model, "Name an animal.", extra_body={"cache": False})
    assert "x-cache" not in headers
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Name an animal."}], temperature=0.9, max_tokens=4
    )
    assert "x-cache" not in raw.headers
    headers, _ = ask(client, model, "Name an animal.", seed=7)  # a seed makes it deterministic too
    assert headers["x-cache"] == "miss"


def test_errors_after_admission_carry_rate_limit_headers(app: CacheAppServer) -> None:
    client = client_for(app)
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, model_of(client), "Hi", max_tokens=100_000)  # beyond the context: refused by the engine
    assert caught.value.response.json()["error"]["code"] == "context_length_exceeded"
    assert caught.value.response.headers["x-ratelimit-limit-requests"] == "10000"


def test_two_processes_share_one_rate_limit(tmp_path: Path) -> None:
    """DS_DEFAULT_RPM=2 in each process: counted per process this would admit 4 of 4 requests."""
    prefix = unique_prefix()
    url = redis_url()
    env = {
        "DS_REDIS_URL": url,
        "DS_REDIS_KEY_PREFIX": prefix,
        "DS_DEFAULT_RPM": "2",
        "DS_RESPONSE_CACHE": "false",
    }
    try:
        with CacheAppServer(tmp_path / "a", **env) as a, CacheAppServer(tmp_path / "b", **env) as b:
            clients = [client_for(a), client_for(b)]
            model = model_of(clients[0])
            statuses: list[int] = []
            rejection: openai.RateLimitError | None = None
            for i in range(4):
                try:
                    headers, _ = ask(clients[i % 2], model, "Hi", max_tokens=1)
                    statuses.append(200)
                    assert headers["x-ratelimit-limit-requests"] == "2"
                except openai.RateLimitError as exc:
                    statuses.append(exc.status_code)
                    rejection = exc
            assert statuses == [200, 200, 429, 429]
            assert rejection is not None
            assert 1 <= int(rejection.response.headers["retry-after"]) <= 30
            assert rejection.response.headers["x-ratelimit-remaining-requests"] == "0"
            error = rejection.response.json()["error"]
            assert error["type"] == "rate_limit_error" and error["message"]
            assert set(error) >= {"message", "type", "param", "code"}
    finally:
        delete_prefix(url, prefix)


def test_redis_killed_during_50_requests(app: CacheAppServer, private_redis_server: PrivateRedis) -> None:
    """Zero failed requests while Redis dies and comes back; afterwards cache and shared limits work."""
    client = client_for(app)
    model = model_of(client)
    failures: list[str] = []
    breaker_states: list[str] = []
    for i in range(50):
        if i == 15:
            private_redis_server.kill()
        if i == 35:
            private_redis_server.start()  # empty: it keeps nothing on disk
        try:
            headers, _ = ask(client, model, f"Count to {i % 5}.", max_tokens=2)
            if "x-ratelimit-limit-requests" not in headers:
                failures.append(f"{i}: no rate-limit headers")
        except openai.OpenAIError as exc:
            failures.append(f"{i}: {exc!r}")
        if i == 30:
            metrics = httpx.get(app.url + "/metrics", timeout=10).text
            breaker_states.extend(line for line in metrics.splitlines() if line.startswith("ds_redis_circuit_state"))
    assert failures == []
    # open (2) or, between trials that fail while Redis is down, half-open (1); never closed (0)
    assert breaker_states and breaker_states[0].split()[-1] in ("1.0", "2.0")
    assert "circuit breaker open" in app.stderr()

    time.sleep(RESET_S + 0.3)
    headers, _ = ask(client, model, "After the outage.")  # the half-open trial closes the breaker
    headers, _ = ask(client, model, "After the outage.")
    assert headers["x-cache"] == "hit"
    probe = redis.Redis.from_url(private_redis_server.url)
    assert any(b"rl:" in k for k in probe.scan_iter(count=1000))  # limits are counted in Redis again
    assert any(b"rc:" in k for k in probe.scan_iter(count=1000))
    probe.close()
