"""The circuit breaker, and the services falling back and recovering when a real Redis dies.

The Redis killed here is a private redis-server on a free port, never the shared one on 6379.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from deepseek_serve.cache import CircuitBreaker, build_cache_layer
from deepseek_serve.config import Settings, load_settings
from deepseek_serve.contracts import Principal
from tests.support.cache import PrivateRedis, private_redis, unique_prefix
from tests.support.net import free_port


class FakeClock:
    # a fake clock for the pure state machine only; the Redis tests below use real time.
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_state_machine() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, reset_s=5.0, clock=clock)
    transitions: list[tuple[str, str]] = []
    breaker.add_listener(lambda old, new: transitions.append((old, new)))
    breaker.record_failure()
    breaker.record_success()  # a success resets the count: failures must be consecutive
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == "closed" and breaker.can_call()
    breaker.record_failure()
    assert breaker.state == "open" and breaker.state_value == 2
    assert not breaker.can_call()
    clock.now += 4.9
    assert not breaker.can_call()
    clock.now += 0.2
    assert breaker.state == "half_open"
    assert breaker.can_call()  # the one trial
    assert not breaker.can_call()  # no second call while the trial is in flight
    breaker.record_failure()  # trial failed: open again for another reset_s
    assert breaker.state == "open"
    clock.now += 5.1
    assert breaker.can_call()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.state_value == 0
    assert transitions == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    assert breaker.num_opened_total == 2


def test_broken_listener_does_not_break_the_breaker() -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_s=1.0)

    def boom(old: str, new: str) -> None:
        raise RuntimeError("metrics down")

    breaker.add_listener(boom)
    breaker.record_failure()
    assert breaker.state == "open"


def settings_for(url: str, **overrides: object) -> Settings:
    base: dict[str, object] = {
        "_env_file": None,
        "redis_url": url,
        "redis_key_prefix": unique_prefix(),
        "redis_timeout_s": 0.2,
        "breaker_failure_threshold": 2,
        "breaker_reset_s": 0.5,
        "default_rpm": 1000,
        "default_tpm": 0,
    }
    base.update(overrides)
    return load_settings(**base)


async def test_unreachable_redis_never_fails_a_call(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing listens on the port: every service answers from its fallback, the breaker opens."""
    layer = build_cache_layer(settings_for(f"redis://127.0.0.1:{free_port()}/0", default_rpm=3))
    assert layer.breaker is not None
    who = Principal(key_id=1)
    with caplog.at_level(logging.WARNING, logger="deepseek_serve.cache.breaker"):
        decisions = [await layer.limiter.admit(who, 0) for _ in range(4)]
    # per-process counters still enforce the limit
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert layer.breaker.state == "open"
    assert any("circuit breaker open" in r.getMessage() for r in caplog.records)
    assert layer.response_cache is not None
    await layer.response_cache.put("k", b"v")
    assert await layer.response_cache.get("k") is None  # bypassed, not an error
    await layer.close()


async def test_open_breaker_costs_no_redis_time() -> None:
    """Redis answers too slowly (a paused server): after the threshold calls return at once."""
    with private_redis() as server:
        layer = build_cache_layer(settings_for(server.url, breaker_reset_s=30.0))
        assert layer.response_cache is not None and layer.breaker is not None
        assert await layer.response_cache.get("warm") is None  # connects while Redis is healthy
        assert server.proc is not None
        server.proc.send_signal(19)  # SIGSTOP: connections stay open, nothing answers
        try:
            loop = asyncio.get_running_loop()
            for _ in range(2):
                assert await layer.response_cache.get("x") is None
            assert layer.breaker.state == "open"
            start = loop.time()
            for _ in range(20):
                assert await layer.response_cache.get("x") is None
                assert (await layer.limiter.admit(Principal(key_id=1), 0)).allowed
            assert loop.time() - start < 0.2  # no call waited for a timeout
        finally:
            server.proc.send_signal(18)  # SIGCONT
        await layer.close()


async def test_kill_and_restart_redis_recovers_shared_state() -> None:
    """Kill the Redis server mid-use: no call fails; once it is back the breaker closes by itself
    and the shared limits and cache work again."""
    server = PrivateRedis()
    server.start()
    try:
        config = settings_for(server.url, default_rpm=5)
        layer, peer = build_cache_layer(config), build_cache_layer(config)
        assert layer.response_cache is not None and peer.response_cache is not None
        assert layer.breaker is not None
        who = Principal(key_id=1)
        await layer.response_cache.put("answer", b"42")
        assert await peer.response_cache.get("answer") == b"42"  # shared through Redis
        assert (await layer.limiter.admit(who, 0)).allowed

        server.kill()
        for _ in range(10):
            await layer.response_cache.get("answer")
            await layer.limiter.admit(who, 0)
        assert layer.breaker.state == "open"

        server.start()  # empty: --save "" keeps nothing
        await asyncio.sleep(0.6)  # > breaker_reset_s
        assert await layer.response_cache.get("answer") is None  # the half-open trial succeeds
        assert layer.breaker.state == "closed"
        await layer.response_cache.put("answer", b"43")
        assert await peer.response_cache.get("answer") == b"43"
        # shared limits again: 5 per minute between the two processes
        results = [await (layer if i % 2 else peer).limiter.admit(who, 0) for i in range(6)]
        assert [d.allowed for d in results] == [True] * 5 + [False]
        await layer.close()
        await peer.close()
    finally:
        server.kill()
