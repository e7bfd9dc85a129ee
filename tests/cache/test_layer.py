"""The cache layer's services, one suite run twice: on a real Redis (`redis_url()`, a random key
prefix) and on the in-process fallbacks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio

from deepseek_serve.cache import (
    LocalRateLimiter,
    LocalResponseCache,
    RedisClient,
    RedisRateLimiter,
    RedisResponseCache,
)
from deepseek_serve.contracts import Principal
from tests.support.cache import SHARED_REDIS_URL, delete_prefix, redis_url, unique_prefix

Limiter = LocalRateLimiter | RedisRateLimiter


@dataclass
class Backend:
    name: str
    client: RedisClient | None

    def limiter(self, rpm: int = 0, tpm: int = 0) -> Limiter:
        if self.client is None:
            return LocalRateLimiter(rpm, tpm)
        return RedisRateLimiter(self.client, rpm, tpm)

    def cache(self, ttl_s: int = 60, max_entry_bytes: int = 4096) -> LocalResponseCache | RedisResponseCache:
        if self.client is None:
            return LocalResponseCache(ttl_s, max_entry_bytes)
        return RedisResponseCache(self.client, ttl_s, max_entry_bytes)


@pytest_asyncio.fixture(params=["redis", "local"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "local":
        yield Backend("local", None)
        return
    prefix = unique_prefix()
    url = redis_url()
    client = RedisClient(url, prefix=prefix, timeout_s=2.0)
    assert await client.ping(), f"the Redis at {url} is not answering"
    yield Backend("redis", client)
    await client.close()
    delete_prefix(url, prefix)


KEY_IDS: dict[str, int] = {}


def key(name: str, rpm: int | None = None, tpm: int | None = None) -> Principal:
    """The key called `name`; each name gets its own database id."""
    key_id = KEY_IDS.setdefault(name, len(KEY_IDS) + 1)
    return Principal(key_id=key_id, name=name, rpm_limit=rpm, tpm_limit=tpm)


# --- rate limits -----------------------------------------------------------------------------------
async def test_requests_per_minute(backend: Backend) -> None:
    limiter = backend.limiter(rpm=3)
    alice = key("alice")
    remaining = []
    for _ in range(3):
        decision = await limiter.admit(alice, 0)
        assert decision.allowed
        remaining.append(decision.remaining_requests)
    assert remaining == [2, 1, 0]
    rejected = await limiter.admit(alice, 0)
    assert not rejected.allowed
    assert rejected.reservation_id is None
    # one request refills in 60/3 = 20 s, less the (short) time since the first admission
    assert rejected.retry_after_s is not None and 15.0 < rejected.retry_after_s <= 20.0
    headers = rejected.headers()
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert 55.0 < float(headers["x-ratelimit-reset-requests"].rstrip("s")) <= 60.0
    assert "x-ratelimit-limit-tokens" not in headers


async def test_keys_have_separate_budgets(backend: Backend) -> None:
    limiter = backend.limiter(rpm=1)
    assert (await limiter.admit(key("a"), 0)).allowed
    assert not (await limiter.admit(key("a"), 0)).allowed
    assert (await limiter.admit(key("b"), 0)).allowed
    anonymous = Principal(key_id=None)
    assert (await limiter.admit(anonymous, 0)).allowed
    assert not (await limiter.admit(anonymous, 0)).allowed


async def test_per_key_override_and_unlimited(backend: Backend) -> None:
    limiter = backend.limiter(rpm=5, tpm=1000)
    strict = key("strict", rpm=1)
    assert (await limiter.admit(strict, 10)).limit_requests == 1
    assert not (await limiter.admit(strict, 10)).allowed
    free = key("free", rpm=0, tpm=0)
    for _ in range(10):
        decision = await limiter.admit(free, 10_000)
        assert decision.allowed
        assert decision.headers() == {}
    default = await limiter.admit(key("default"), 10)
    assert (default.limit_requests, default.limit_tokens) == (5, 1000)


async def test_tokens_reserved_then_settled(backend: Backend) -> None:
    limiter = backend.limiter(tpm=100)
    bob = key("bob")
    first = await limiter.admit(bob, 60)
    assert first.allowed and first.remaining_tokens == 40
    assert first.headers()["x-ratelimit-remaining-tokens"] == "40"
    refused = await limiter.admit(bob, 60)
    assert not refused.allowed
    # 20 missing tokens at 100/60 per second
    assert refused.retry_after_s is not None and 8.0 < refused.retry_after_s <= 12.0
    await limiter.settle(bob, first, actual_tokens=10)  # 50 unused tokens go back
    second = await limiter.admit(bob, 60)
    assert second.allowed
    assert 29 <= (second.remaining_tokens or 0) <= 31


async def test_settle_charges_an_overrun(backend: Backend) -> None:
    limiter = backend.limiter(tpm=100)
    carol = key("carol")
    first = await limiter.admit(carol, 10)
    await limiter.settle(carol, first, actual_tokens=70)
    assert not (await limiter.admit(carol, 40)).allowed
    assert (await limiter.admit(carol, 25)).allowed


async def test_request_larger_than_budget_needs_a_full_bucket(backend: Backend) -> None:
    limiter = backend.limiter(tpm=100)
    dave = key("dave")
    big = await limiter.admit(dave, 250)
    assert big.allowed
    assert big.remaining_tokens is not None and big.remaining_tokens < 0
    assert big.headers()["x-ratelimit-remaining-tokens"] == "0"
    refused = await limiter.admit(dave, 1)
    # 150 tokens of debt + 1 at 100/60 per second: about 90.6 s
    assert refused.retry_after_s is not None and refused.retry_after_s > 89.0


async def test_bucket_refills_continuously(backend: Backend) -> None:
    limiter = backend.limiter(tpm=600)  # 10 tokens per second
    erin = key("erin")
    assert (await limiter.admit(erin, 600)).allowed
    assert not (await limiter.admit(erin, 30)).allowed  # 3 s of refill
    await asyncio.sleep(0.45)
    assert (await limiter.admit(erin, 3)).allowed


async def test_concurrent_admissions_are_atomic(backend: Backend) -> None:
    limiter = backend.limiter(rpm=10, tpm=10_000)
    frank = key("frank")
    decisions = await asyncio.gather(*(limiter.admit(frank, 100) for _ in range(25)))
    assert sum(d.allowed for d in decisions) == 10


async def test_two_clients_share_one_budget() -> None:
    """Two connection pools (as two processes would have) on one prefix draw from one bucket."""
    prefix = unique_prefix()
    url = redis_url()
    clients = [RedisClient(url, prefix=prefix, timeout_s=2.0) for _ in range(2)]
    try:
        limiters = [RedisRateLimiter(c, 4, 0) for c in clients]
        results = [await limiters[i % 2].admit(key("shared"), 0) for i in range(6)]
        assert [d.allowed for d in results] == [True] * 4 + [False] * 2
    finally:
        for c in clients:
            await c.close()
        delete_prefix(url, prefix)


async def test_redis_bucket_keys_hold_the_key_id_as_text() -> None:
    """Key 5's buckets are `rl:{5}:req|tok`, the anonymous caller's `rl:{anonymous}:...`."""
    client = RedisClient(SHARED_REDIS_URL, prefix="ds:")
    try:
        limiter = RedisRateLimiter(client, 1, 1)
        assert limiter._keys(Principal(key_id=5)) == ["ds:rl:{5}:req", "ds:rl:{5}:tok"]
        assert limiter._keys(Principal(key_id=None)) == ["ds:rl:{anonymous}:req", "ds:rl:{anonymous}:tok"]
    finally:
        await client.close()


# --- response cache --------------------------------------------------------------------------------
async def test_cache_put_get_and_size_limit(backend: Backend) -> None:
    cache = backend.cache(max_entry_bytes=2048)
    k = "resp:" + "ab" * 32
    assert await cache.get(k) is None
    entry = '{"object": "chat.completion", "choices": [{"message": {"content": "héllo"}}]}'.encode()
    await cache.put(k, entry)
    assert await cache.get(k) == entry
    too_big = "resp:" + "cd" * 32
    await cache.put(too_big, b"x" * 4096)
    assert await cache.get(too_big) is None


async def test_cache_entries_expire(backend: Backend) -> None:
    cache = backend.cache(ttl_s=1)
    await cache.put("k1", b"value")
    assert await cache.get("k1") == b"value"
    await asyncio.sleep(1.2)
    assert await cache.get("k1") is None


async def test_local_cache_evicts_least_recently_used() -> None:
    cache = LocalResponseCache(ttl_s=60, max_entry_bytes=100, max_total_bytes=250)
    for name in ("a", "b"):
        await cache.put(name, b"x" * 100)
    assert await cache.get("a") is not None  # "b" is now the least recently used
    await cache.put("c", b"x" * 100)
    assert await cache.get("b") is None
    assert await cache.get("a") is not None and await cache.get("c") is not None


def test_build_cache_layer_picks_backends() -> None:
    from deepseek_serve.cache import build_cache_layer
    from deepseek_serve.config import load_settings

    embedded = build_cache_layer(load_settings(_env_file=None))
    assert embedded.client is None and embedded.breaker is None
    assert isinstance(embedded.limiter, LocalRateLimiter)
    assert isinstance(embedded.response_cache, LocalResponseCache)
    off = build_cache_layer(load_settings(_env_file=None, response_cache=False, redis_url=SHARED_REDIS_URL))
    assert off.response_cache is None
    assert off.client is not None and off.breaker is not None and off.breaker.state == "closed"
