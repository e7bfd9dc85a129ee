"""The pooled Redis connection, wrapped in a circuit breaker and a per-call deadline."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from deepseek_serve.cache.breaker import CircuitBreaker

if TYPE_CHECKING:
    from deepseek_serve.config import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")


class RedisUnavailable(Exception):
    """Redis is down, slow, or the breaker is open: the caller uses its in-process fallback."""


class RedisClient:
    """One connection pool per process, shared by the limiter and the response cache.

    Every call goes through `run`: it is refused at once while the breaker is open, and cut off after
    `2 * timeout_s` (socket, connect and pool-wait timeouts are `timeout_s`; one retry).
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "ds:",
        timeout_s: float = 0.25,
        pool_size: int = 50,
        failure_threshold: int = 3,
        reset_s: float = 5.0,
    ) -> None:
        self.prefix = prefix
        self.timeout_s = timeout_s
        # BlockingConnectionPool waits (up to timeout_s) for a free connection instead of failing
        self.pool: aioredis.BlockingConnectionPool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=pool_size,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=30,
            # one immediate retry, for a pooled connection gone stale across a Redis restart;
            # the whole call stays bounded by 2 * timeout_s in `run`
            retry=Retry(NoBackoff(), 1),
        )
        self.redis = aioredis.Redis(connection_pool=self.pool)
        self.breaker = CircuitBreaker(failure_threshold, reset_s, name="redis")

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisClient:
        return cls(
            settings.redis_url,
            prefix=settings.redis_key_prefix,
            timeout_s=settings.redis_timeout_s,
            pool_size=settings.redis_pool_size,
            failure_threshold=settings.breaker_failure_threshold,
            reset_s=settings.breaker_reset_s,
        )

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    @property
    def is_available(self) -> bool:
        """False while the breaker is open (the fallbacks are in use)."""
        return self.breaker.state != "open"

    async def run(self, op: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run one Redis operation; raise RedisUnavailable when it cannot or did not succeed in time."""
        if not self.breaker.can_call():
            raise RedisUnavailable("circuit breaker open")
        try:
            result = await asyncio.wait_for(op(self.redis), self.timeout_s * 2)
        except (RedisError, OSError, TimeoutError, asyncio.TimeoutError) as exc:  # distinct on 3.10
            self.breaker.record_failure(f"{type(exc).__name__}: {exc}")
            raise RedisUnavailable(str(exc)) from exc
        except BaseException:
            # cancelled mid-call: release a half-open trial slot without judging Redis
            self.breaker.release_trial()
            raise
        self.breaker.record_success()
        return result

    async def ping(self) -> bool:
        try:
            return bool(await self.run(lambda r: r.ping()))
        except RedisUnavailable:
            return False

    async def close(self) -> None:
        # the client does not own the pool; disconnecting the pool closes every connection
        await self.pool.disconnect()
