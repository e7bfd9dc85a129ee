"""The access guards that run before a request's body is read: the failed-authentication throttle per
client address and the cap on in-flight requests per API key.

Both have an in-process implementation (the embedded default, and the fallback while Redis is down)
and a Redis one, so that every worker and every replica behind one Redis shares one budget:

- `AuthThrottle`: a token bucket per address, capacity `per_min`, refilled at `per_min / 60` a
  second; each failure takes 1, an empty bucket refuses with the time until it holds 1 again. In
  Redis the bucket is a hash `{prefix}af:{<address>}` updated by one Lua script on the server clock.
- `KeyConcurrency`: a lease per in-flight request. In Redis the leases of a key are members of a
  sorted set `{prefix}cc:{<key id>}` scored by their expiry; a lease lives `lease_s` seconds and a
  heartbeat renews the leases this process holds, so a crashed process frees its slots within
  `lease_s` instead of holding them forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deepseek_serve.cache import lua
from deepseek_serve.cache.client import RedisClient, RedisUnavailable

if TYPE_CHECKING:
    from deepseek_serve.config import Settings

logger = logging.getLogger(__name__)


# --- failed authentications per address -------------------------------------------------------------
@dataclass
class _Bucket:
    level: float
    updated: float


class LocalAuthThrottle:
    """The bucket per address in this process. Addresses are kept LRU, at most `max_addresses`, so
    memory stays bounded whatever addresses an attacker uses (an evicted address starts afresh)."""

    backend = "local"

    def __init__(
        self, per_min: int, *, max_addresses: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.capacity = float(per_min)
        self.rate = per_min / 60.0
        self.max_addresses = max_addresses
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def _refilled(self, address: str) -> _Bucket | None:
        bucket = self._buckets.get(address)
        if bucket is None:
            return None
        now = self._clock()
        bucket.level = min(self.capacity, bucket.level + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.level >= self.capacity:
            del self._buckets[address]  # full again: nothing to remember
            return None
        return bucket

    async def retry_after(self, address: str) -> float | None:
        """Seconds until `address` may try again, or None when it may try now."""
        bucket = self._refilled(address)
        if bucket is None or bucket.level >= 1.0:
            return None
        return (1.0 - bucket.level) / self.rate

    async def record_failure(self, address: str) -> None:
        bucket = self._refilled(address)
        if bucket is None:
            bucket = _Bucket(self.capacity, self._clock())
            self._buckets[address] = bucket
            while len(self._buckets) > self.max_addresses:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(address)
        bucket.level = max(bucket.level - 1.0, 0.0)


# KEYS: the bucket. ARGV: capacity, 1 to record a failure (0 to check). Returns the retry time in ms
# (0: the address may try now).
_AUTH_LUA = (
    lua.BUCKET
    + """
local cap, record = tonumber(ARGV[1]), tonumber(ARGV[2])
local level = refilled(KEYS[1], cap) or cap
if record == 1 then
  level = math.max(level - 1, 0)
  store(KEYS[1], cap, level)
end
if level >= 1 then return 0 end
return math.ceil((1 - level) * window / cap)
"""
)


class RedisAuthThrottle:
    """The bucket per address in Redis; raises RedisUnavailable when Redis cannot answer."""

    backend = "redis"

    def __init__(self, client: RedisClient, per_min: int) -> None:
        self.client = client
        self.capacity = per_min
        self._script = client.redis.register_script(_AUTH_LUA)

    async def _call(self, address: str, record: int) -> float | None:
        keys, args = [self.client.key("af", "{" + address + "}")], [self.capacity, record]
        raw: Any = await self.client.run(lambda r: self._script(keys=keys, args=args, client=r))
        wait_ms = int(raw)
        return wait_ms / 1000 if wait_ms > 0 else None

    async def retry_after(self, address: str) -> float | None:
        return await self._call(address, 0)

    async def record_failure(self, address: str) -> None:
        await self._call(address, 1)


class AuthThrottle:
    """Redis when it answers (or no Redis configured: in process only), the local bucket otherwise."""

    def __init__(self, local: LocalAuthThrottle, shared: RedisAuthThrottle | None = None) -> None:
        self.local = local
        self.shared = shared

    async def retry_after(self, address: str) -> float | None:
        if self.shared is not None:
            try:
                return await self.shared.retry_after(address)
            except RedisUnavailable:
                pass
        return await self.local.retry_after(address)

    async def record_failure(self, address: str) -> None:
        if self.shared is not None:
            try:
                await self.shared.record_failure(address)
                return
            except RedisUnavailable:
                pass
        await self.local.record_failure(address)


# --- in-flight requests per key --------------------------------------------------------------------
@dataclass(frozen=True)
class Lease:
    """One admitted request's slot: release it exactly once."""

    key_id: int
    backend: str
    member: str = ""


class LocalKeyConcurrency:
    """In-flight requests per key id in this process."""

    backend = "local"

    def __init__(self) -> None:
        self._in_flight: dict[int, int] = {}

    def try_acquire(self, key_id: int, limit: int) -> Lease | None:
        count = self._in_flight.get(key_id, 0)
        if limit and count >= limit:
            return None
        self._in_flight[key_id] = count + 1
        return Lease(key_id, self.backend)

    def release(self, lease: Lease) -> None:
        count = self._in_flight.get(lease.key_id, 0) - 1
        if count > 0:
            self._in_flight[lease.key_id] = count
        else:
            self._in_flight.pop(lease.key_id, None)

    def in_flight(self, key_id: int) -> int:
        return self._in_flight.get(key_id, 0)


# KEYS: the key's lease set. ARGV: limit, member, lease ms. Returns 1 when the lease was taken.
_ACQUIRE_LUA = (
    lua.NOW
    + """
local limit, member, lease = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= limit then return 0 end
redis.call('ZADD', KEYS[1], now + lease, member)
redis.call('PEXPIRE', KEYS[1], lease + 1000)
return 1
"""
)

# KEYS: lease sets. ARGV: lease ms, then one member per key. Renews the members that still exist.
_RENEW_LUA = (
    lua.NOW
    + """
local lease = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + lease, ARGV[i + 1])
  redis.call('PEXPIRE', key, lease + 1000)
end
return #KEYS
"""
)


class RedisKeyConcurrency:
    """Leases in Redis shared by every process; raises RedisUnavailable when Redis cannot answer.
    While this process holds leases, a heartbeat task renews them every `lease_s / 3` seconds."""

    backend = "redis"

    def __init__(self, client: RedisClient, *, lease_s: float = 30.0) -> None:
        self.client = client
        self.lease_ms = max(1, int(lease_s * 1000))
        self._acquire = client.redis.register_script(_ACQUIRE_LUA)
        self._renew = client.redis.register_script(_RENEW_LUA)
        self._owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._ids = itertools.count()
        self._held: dict[str, int] = {}  # member -> key id
        self._heartbeat: asyncio.Task[None] | None = None

    def _key(self, key_id: int) -> str:
        return self.client.key("cc", "{" + str(key_id) + "}")

    async def try_acquire(self, key_id: int, limit: int) -> Lease | None:
        member = f"{self._owner}-{next(self._ids)}"
        keys, args = [self._key(key_id)], [str(limit), member, str(self.lease_ms)]
        raw: Any = await self.client.run(lambda r: self._acquire(keys=keys, args=args, client=r))
        if not int(raw):
            return None
        self._held[member] = key_id
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())
        return Lease(key_id, self.backend, member)

    async def release(self, lease: Lease) -> None:
        self._held.pop(lease.member, None)
        key = self._key(lease.key_id)
        await self.client.run(lambda r: r.zrem(key, lease.member))

    async def renew(self) -> None:
        """Push the expiry of every lease this process holds `lease_s` ahead."""
        held = list(self._held.items())
        if not held:
            return
        keys = [self._key(key_id) for _, key_id in held]
        args: list[Any] = [self.lease_ms, *(member for member, _ in held)]
        await self.client.run(lambda r: self._renew(keys=keys, args=args, client=r))

    async def _beat(self) -> None:
        while self._held:
            await asyncio.sleep(self.lease_ms / 3000)
            try:
                await self.renew()
            except RedisUnavailable:
                pass  # the leases expire on their own; admissions use the local fallback meanwhile

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat


class KeyConcurrency:
    """At most `limit` in-flight requests per key (0 = no limit): in Redis when it answers, in this
    process otherwise (a lease is released where it was taken)."""

    def __init__(self, limit: int, shared: RedisKeyConcurrency | None = None) -> None:
        self.limit = limit
        self.local = LocalKeyConcurrency()
        self.shared = shared

    async def try_acquire(self, key_id: int) -> Lease | None:
        if not self.limit:
            return Lease(key_id, "none")
        if self.shared is not None:
            try:
                return await self.shared.try_acquire(key_id, self.limit)
            except RedisUnavailable:
                pass
        return self.local.try_acquire(key_id, self.limit)

    async def release(self, lease: Lease) -> None:
        if lease.backend == "local":
            self.local.release(lease)
        elif lease.backend == "redis" and self.shared is not None:
            with contextlib.suppress(RedisUnavailable):  # no longer renewed: it expires within lease_s
                await self.shared.release(lease)

    async def close(self) -> None:
        if self.shared is not None:
            await self.shared.close()


def build_guards(settings: Settings, client: RedisClient | None) -> tuple[AuthThrottle | None, KeyConcurrency]:
    """The throttle (None when `DS_AUTH_FAILURES_PER_MIN` is 0) and the per-key cap
    (`DS_MAX_CONCURRENT_PER_KEY`), shared through Redis when a client is given."""
    per_min = settings.auth_failures_per_min
    throttle = None
    if per_min > 0:
        throttle = AuthThrottle(LocalAuthThrottle(per_min), RedisAuthThrottle(client, per_min) if client else None)
    shared = RedisKeyConcurrency(client) if client is not None and settings.max_concurrent_per_key else None
    return throttle, KeyConcurrency(settings.max_concurrent_per_key, shared)
