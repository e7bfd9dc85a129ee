"""Rate limits, the response cache and the access guards: Redis when `DS_REDIS_URL` is set, in
process otherwise.

`build_cache_layer(settings)` returns the services for `serving.services.Services`; each has an
in-process implementation of the same interface, used as the embedded default and, behind the
circuit breaker of `RedisClient`, while Redis is slow or down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from deepseek_serve.cache.breaker import CircuitBreaker
from deepseek_serve.cache.client import RedisClient, RedisUnavailable
from deepseek_serve.cache.guards import AuthThrottle, KeyConcurrency, build_guards
from deepseek_serve.cache.limiter import (
    FailoverRateLimiter,
    LocalRateLimiter,
    RedisRateLimiter,
    build_rate_limiter,
)
from deepseek_serve.cache.response_cache import LocalResponseCache, RedisResponseCache, build_response_cache
from deepseek_serve.contracts import CacheState

if TYPE_CHECKING:
    from deepseek_serve.config import Settings

__all__ = [
    "CacheLayer",
    "CircuitBreaker",
    "FailoverRateLimiter",
    "LocalRateLimiter",
    "LocalResponseCache",
    "RedisClient",
    "RedisRateLimiter",
    "RedisResponseCache",
    "RedisUnavailable",
    "build_cache_layer",
]


@dataclass
class CacheLayer:
    """The cache layer's services; `client` is None when running without Redis."""

    limiter: LocalRateLimiter | FailoverRateLimiter
    response_cache: LocalResponseCache | RedisResponseCache | None
    client: RedisClient | None
    auth_throttle: AuthThrottle | None = None
    key_concurrency: KeyConcurrency | None = None

    @property
    def breaker(self) -> CircuitBreaker | None:
        """The Redis circuit breaker; None without Redis."""
        return self.client.breaker if self.client is not None else None

    def metrics_snapshot(self) -> CacheState:
        """What `/metrics` exports of the cache layer: the Redis breaker's state."""
        breaker = self.breaker
        return CacheState(redis_circuit_state=breaker.state_value if breaker is not None else None)

    async def close(self) -> None:
        if self.key_concurrency is not None:
            await self.key_concurrency.close()
        if self.client is not None:
            await self.client.close()


def build_cache_layer(settings: Settings) -> CacheLayer:
    """Build the limiter, the response cache (None when `DS_RESPONSE_CACHE=false`) and the access
    guards (cache/guards.py).

    Does no I/O: the Redis pool connects lazily, so a server starts even when Redis is down.
    """
    client = RedisClient.from_settings(settings) if settings.redis_url else None
    throttle, concurrency = build_guards(settings, client)
    return CacheLayer(
        limiter=build_rate_limiter(settings, client),
        response_cache=build_response_cache(settings, client) if settings.response_cache else None,
        client=client,
        auth_throttle=throttle,
        key_concurrency=concurrency,
    )
