"""The access guards (cache/guards.py) on a real Redis: two guard objects built on separate clients
stand for two worker processes (they share nothing but the Redis), so they must share one budget; a
lease of a process that died expires; Redis going down falls back to per-process guards."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest_asyncio

from deepseek_serve.cache.client import RedisClient
from deepseek_serve.cache.guards import (
    AuthThrottle,
    KeyConcurrency,
    LocalAuthThrottle,
    RedisAuthThrottle,
    RedisKeyConcurrency,
)
from tests.support.cache import delete_prefix, private_redis, redis_url, unique_prefix


@pytest_asyncio.fixture
async def clients() -> AsyncIterator[tuple[RedisClient, RedisClient]]:
    """Two clients with their own connection pools on one Redis and one key prefix."""
    prefix, url = unique_prefix(), redis_url()
    pair = (RedisClient(url, prefix=prefix, timeout_s=2.0), RedisClient(url, prefix=prefix, timeout_s=2.0))
    assert await pair[0].ping(), f"the Redis at {url} is not answering"
    yield pair
    for client in pair:
        await client.close()
    delete_prefix(url, prefix)


async def test_local_auth_throttle_refills_and_is_bounded() -> None:
    now = [0.0]
    throttle = LocalAuthThrottle(6, max_addresses=3, clock=lambda: now[0])
    for _ in range(6):
        assert await throttle.retry_after("a") is None
        await throttle.record_failure("a")
    wait = await throttle.retry_after("a")
    assert wait is not None and 9.9 < wait <= 10.0  # one failure refills in 60/6 s
    now[0] += 10.0
    assert await throttle.retry_after("a") is None
    for address in ("b", "c", "d"):
        await throttle.record_failure(address)
    assert await throttle.retry_after("a") is None and len(throttle._buckets) == 3


async def test_failed_authentications_count_across_processes(clients: tuple[RedisClient, RedisClient]) -> None:
    one, two = (AuthThrottle(LocalAuthThrottle(4), RedisAuthThrottle(c, 4)) for c in clients)
    for throttle in (one, two, one, two):  # four failures, two in each "process"
        assert await throttle.retry_after("203.0.113.9") is None
        await throttle.record_failure("203.0.113.9")
    for throttle in (one, two):
        wait = await throttle.retry_after("203.0.113.9")
        assert wait is not None and 14.0 < wait <= 15.0  # one failure refills in 60/4 s
    assert await one.retry_after("203.0.113.10") is None  # another address has its own bucket
    assert await one.local.retry_after("203.0.113.9") is None  # nothing was counted in process


async def test_the_concurrency_cap_holds_across_processes(clients: tuple[RedisClient, RedisClient]) -> None:
    one, two = (KeyConcurrency(3, RedisKeyConcurrency(c, lease_s=30.0)) for c in clients)
    leases = [await one.try_acquire(7), await two.try_acquire(7), await one.try_acquire(7)]
    assert all(lease is not None for lease in leases)
    assert await two.try_acquire(7) is None and await one.try_acquire(7) is None
    assert await two.try_acquire(8) is not None  # another key has its own slots
    await one.release(leases[0])
    again = await two.try_acquire(7)
    assert again is not None and again.backend == "redis"
    assert await one.try_acquire(7) is None
    for g in (one, two):
        await g.close()


async def test_a_dead_process_frees_its_slots_and_a_live_one_keeps_them(
    clients: tuple[RedisClient, RedisClient],
) -> None:
    dead = RedisKeyConcurrency(clients[0], lease_s=0.6)
    live = RedisKeyConcurrency(clients[1], lease_s=0.6)
    assert await dead.try_acquire(5, 2) is not None
    dead._held.clear()  # a process killed mid-request: its heartbeat renews nothing any more
    await dead.close()
    held = await live.try_acquire(5, 2)
    assert held is not None
    assert await live.try_acquire(5, 2) is None  # both slots taken
    await asyncio.sleep(1.5)  # past the dead lease; the live one is renewed every 0.2 s
    assert await live.try_acquire(5, 2) is not None  # the dead process's slot came back
    assert await live.try_acquire(5, 2) is None  # the live lease still counts
    await live.close()


async def test_guards_fall_back_to_the_process_when_redis_is_down() -> None:
    with private_redis() as server:
        client = RedisClient(server.url, prefix=unique_prefix(), timeout_s=0.3, failure_threshold=1)
        gate = KeyConcurrency(1, RedisKeyConcurrency(client))
        throttle = AuthThrottle(LocalAuthThrottle(2), RedisAuthThrottle(client, 2))
        shared = await gate.try_acquire(1)
        assert shared is not None and shared.backend == "redis"
        server.kill()
        local = await gate.try_acquire(2)
        assert local is not None and local.backend == "local"  # admitted, in process
        assert await gate.try_acquire(2) is None  # and the cap still holds there
        await gate.release(shared)  # Redis is gone: nothing raised, the lease expires there
        await gate.release(local)
        assert await gate.try_acquire(2) is not None
        for _ in range(2):
            await throttle.record_failure("198.51.100.7")
        assert await throttle.retry_after("198.51.100.7") is not None  # counted in process
        await gate.close()
        await client.close()


async def test_no_limit_means_no_redis_call() -> None:
    client = RedisClient("redis://127.0.0.1:1/0", timeout_s=0.1)  # nothing listens there
    gate = KeyConcurrency(0, RedisKeyConcurrency(client))
    leases = [await gate.try_acquire(1) for _ in range(50)]
    assert all(lease is not None for lease in leases)
    assert client.breaker.state == "closed"  # never asked
    await client.close()
