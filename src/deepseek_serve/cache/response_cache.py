"""Exact-match response cache for deterministic requests.

A request is cacheable when its output is a function of its input: temperature 0 or an explicit
seed (`is_cacheable`). The key hashes the model, the endpoint, the rendered prompt and every
sampling parameter (`cache_key`); the value is whatever bytes the API stores (a serialized
`CachedCompletion`). Entries above `max_entry_bytes` are not stored; entries expire after `ttl_s`.

Redis: plain `SET key value EX ttl`. In process: an LRU bounded by total bytes. While the Redis
breaker is open the cache is bypassed (every `get` misses, every `put` is dropped), never swapped
for the local one: a process-local copy would serve answers the other replicas never saw cached.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from deepseek_serve.cache.client import RedisClient, RedisUnavailable

if TYPE_CHECKING:
    from deepseek_serve.config import Settings

CACHE_FORMAT_VERSION = 1
LOCAL_CACHE_MAX_TOTAL_BYTES = 64 * 1024 * 1024


def is_cacheable(temperature: float, seed: int | None, n: int = 1) -> bool:
    """Deterministic requests only: greedy, or sampled with an explicit seed."""
    return (temperature == 0.0 or seed is not None) and n >= 1


def cache_key(*, model: str, endpoint: str, prompt: str | list[int], params: Mapping[str, Any]) -> str:
    """A stable hex digest of everything that decides the output.

    `params` must hold every sampling parameter (max_tokens, temperature, top_p, top_k, min_p,
    penalties, seed, stop, logprobs, n...); key order does not matter.
    """
    payload = {
        "v": CACHE_FORMAT_VERSION,
        "model": model,
        "endpoint": endpoint,
        "prompt": prompt,
        "params": dict(params),
    }
    blob = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class CachedChoice:
    text: str
    finish_reason: str | None
    reasoning_content: str | None = None
    logprobs: Any = None  # the API's logprobs object, stored as sent


@dataclass(frozen=True)
class CachedCompletion:
    """What a hit needs to answer again, streaming or not, without the engine."""

    model: str
    choices: list[CachedChoice] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    created: int = 0

    def to_bytes(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> CachedCompletion | None:
        """None when the bytes are not a cache entry of this format (treated as a miss)."""
        try:
            raw = orjson.loads(data)
            choices = [CachedChoice(**c) for c in raw.pop("choices")]
            return cls(choices=choices, **raw)
        except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError):
            return None


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
