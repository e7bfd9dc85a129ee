"""Exact-match response cache: opaque keys to opaque bytes.

The API decides what is cacheable, computes the key and stores the finished JSON body; this module
only keeps the bytes. Entries above `max_entry_bytes` are not stored; entries expire after `ttl_s`.

Redis: plain `SET key value EX ttl`. In process: an LRU bounded by total bytes. While the Redis
breaker is open the cache is bypassed (every `get` misses, every `put` is dropped), never swapped
for the local one: a process-local copy would serve answers the other replicas never saw cached.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from deepseek_serve.cache.client import RedisClient, RedisUnavailable

if TYPE_CHECKING:
    from deepseek_serve.config import Settings

LOCAL_CACHE_MAX_TOTAL_BYTES = 64 * 1024 * 1024


class LocalResponseCache:
    """In-process LRU with TTL, bounded by entry size and total bytes."""

    def __init__(
        self,
        ttl_s: float,
        max_entry_bytes: int,
        max_total_bytes: int = LOCAL_CACHE_MAX_TOTAL_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entry_bytes = max_entry_bytes
        self.max_total_bytes = max_total_bytes
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._total_bytes = 0

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires_at, value = entry
        if self._clock() >= expires_at:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return value

    async def put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_entry_bytes:
            return
        self._drop(key)
        self._entries[key] = (self._clock() + self.ttl_s, value)
        self._total_bytes += len(value)
        while self._total_bytes > self.max_total_bytes and self._entries:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._total_bytes -= len(entry[1])

    def __len__(self) -> int:
        return len(self._entries)


class RedisResponseCache:
    """Entries shared by every process; bypassed (miss / no-op) while Redis is unavailable."""

    def __init__(self, client: RedisClient, ttl_s: int, max_entry_bytes: int) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.max_entry_bytes = max_entry_bytes

    def _key(self, key: str) -> str:
        return self.client.key("rc", key)

    async def get(self, key: str) -> bytes | None:
        name = self._key(key)
        try:
            value: Any = await self.client.run(lambda r: r.get(name))
        except RedisUnavailable:
            return None
        return bytes(value) if value is not None else None

    async def put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_entry_bytes:
            return
        name = self._key(key)
        try:
            await self.client.run(lambda r: r.set(name, value, ex=self.ttl_s))
        except RedisUnavailable:
            pass


def build_response_cache(settings: Settings, client: RedisClient | None) -> LocalResponseCache | RedisResponseCache:
    if client is None:
        return LocalResponseCache(settings.response_cache_ttl_s, settings.response_cache_max_bytes)
    return RedisResponseCache(client, settings.response_cache_ttl_s, settings.response_cache_max_bytes)
