"""Per-key rate limits: requests per minute and tokens per minute, as two token buckets.

Algorithm (the same in Redis and in process): each limit is a bucket of capacity `limit` that
refills continuously at `limit / 60` per second (a token bucket, equivalent to GCRA). Admission
takes 1 from the request bucket and reserves `prompt + max_tokens` from the token bucket, both or
neither; `settle` returns the unused part of the reservation (or takes the overrun). A reservation
larger than the whole budget is admitted only from a full bucket and leaves it in debt, so big
requests are possible but still pay their full price.

Headers follow OpenAI: `remaining` is the bucket level, `reset` the time until it is full again;
`retry_after` on a rejection is the time until the request would fit.

In Redis both buckets of a key live in hashes `{prefix}rl:{<key>}:req|tok` (one hash slot) and
are updated by one Lua script using the server clock, so any number of processes share one budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deepseek_serve.cache import lua
from deepseek_serve.cache.client import RedisClient, RedisUnavailable
from deepseek_serve.contracts import Principal, RateLimitDecision

if TYPE_CHECKING:
    from deepseek_serve.config import Settings

WINDOW_S = 60.0
ANONYMOUS_KEY = "anonymous"

# KEYS: request bucket, token bucket. ARGV: rpm (0 = off), tpm (0 = off), tokens to reserve.
# Returns {allowed, req_remaining, req_reset_ms, tok_remaining, tok_reset_ms, retry_after_ms}.
_ADMIT_LUA = (
    lua.BUCKET
    + """
local function reset_ms(cap, level)
  return math.ceil(math.max(0, cap - level) * window / cap)
end

local rpm, tpm, reserve = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local lr, lt = 0, 0
local retry = 0
if rpm > 0 then
  lr = refilled(KEYS[1], rpm) or rpm
  if lr < 1 then retry = math.max(retry, math.ceil((1 - lr) * window / rpm)) end
end
if tpm > 0 then
  lt = refilled(KEYS[2], tpm) or tpm
  local need = math.min(reserve, tpm)
  if lt < need then retry = math.max(retry, math.ceil((need - lt) * window / tpm)) end
end
local allowed = 0
if retry == 0 then
  allowed = 1
  if rpm > 0 then lr = lr - 1; store(KEYS[1], rpm, lr) end
  if tpm > 0 then lt = lt - reserve; store(KEYS[2], tpm, lt) end
end
local rr, rt = 0, 0
if rpm > 0 then rr = reset_ms(rpm, lr) end
if tpm > 0 then rt = reset_ms(tpm, lt) end
return {allowed, math.floor(lr), rr, math.floor(lt), rt, retry}
"""
)

# KEYS: token bucket. ARGV: tpm, tokens to give back (negative = take more).
_SETTLE_LUA = (
    lua.BUCKET
    + """
local cap, delta = tonumber(ARGV[1]), tonumber(ARGV[2])
local level = refilled(KEYS[1], cap)
if level == nil then return 0 end
store(KEYS[1], cap, math.min(cap, level + delta))
return 1
"""
)


@dataclass(frozen=True)
class Limits:
    """The effective limits of one caller; None = unlimited."""

    rpm: int | None
    tpm: int | None

    @property
    def is_unlimited(self) -> bool:
        return self.rpm is None and self.tpm is None


def limits_for(principal: Principal, default_rpm: int, default_tpm: int) -> Limits:
    """Per-key override when set, else the default; 0 means unlimited."""
    rpm = principal.rpm_limit if principal.rpm_limit is not None else default_rpm
    tpm = principal.tpm_limit if principal.tpm_limit is not None else default_tpm
    return Limits(rpm or None, tpm or None)


def _bucket_name(principal: Principal) -> str:
    """The key's id as text (the Redis key `rl:{5}:req` for key 5), or `anonymous`."""
    return ANONYMOUS_KEY if principal.key_id is None else str(principal.key_id)


def _reservation(backend: str, reserve: int) -> str:
    return f"{backend}|{reserve}"


def _parse_reservation(decision: RateLimitDecision) -> tuple[str, int] | None:
    if not decision.reservation_id:
        return None
    backend, _, amount = decision.reservation_id.partition("|")
    try:
        return backend, int(amount)
    except ValueError:
        return None


def _unlimited() -> RateLimitDecision:
    return RateLimitDecision(True, None, None, None, None, None, None)


# --- in process ------------------------------------------------------------------------------------
class _Bucket:
    __slots__ = ("level", "ts")

    def __init__(self, level: float, ts: float) -> None:
        self.level = level
        self.ts = ts


class LocalRateLimiter:
    """The same buckets in this process only (the embedded default, and the fallback while Redis is out)."""

    backend = "local"

    def __init__(self, default_rpm: int, default_tpm: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.default_rpm = default_rpm
        self.default_tpm = default_tpm
        self._clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def _level(self, name: str, kind: str, cap: int, now: float) -> float:
        bucket = self._buckets.get((name, kind))
        if bucket is None:
            return float(cap)
        return min(cap, bucket.level + max(0.0, now - bucket.ts) * cap / WINDOW_S)

    def _store(self, name: str, kind: str, level: float, now: float) -> None:
        self._buckets[(name, kind)] = _Bucket(level, now)

    async def admit(self, principal: Principal, reserve_tokens: int) -> RateLimitDecision:
        limits = limits_for(principal, self.default_rpm, self.default_tpm)
        if limits.is_unlimited:
            return _unlimited()
        self._prune()
        name, now = _bucket_name(principal), self._clock()
        reserve = max(0, reserve_tokens)
        lr = self._level(name, "req", limits.rpm, now) if limits.rpm else 0.0
        lt = self._level(name, "tok", limits.tpm, now) if limits.tpm else 0.0
        retry = 0.0
        if limits.rpm and lr < 1:
            retry = max(retry, (1 - lr) * WINDOW_S / limits.rpm)
        if limits.tpm and lt < min(reserve, limits.tpm):
            retry = max(retry, (min(reserve, limits.tpm) - lt) * WINDOW_S / limits.tpm)
        allowed = retry == 0.0
        if allowed:
            if limits.rpm:
                lr -= 1
                self._store(name, "req", lr, now)
            if limits.tpm:
                lt -= reserve
                self._store(name, "tok", lt, now)
        return _decision(limits, allowed, lr, lt, retry, self.backend, reserve)

    async def settle(self, principal: Principal, decision: RateLimitDecision, actual_tokens: int) -> None:
        parsed = _parse_reservation(decision)
        limits = limits_for(principal, self.default_rpm, self.default_tpm)
        if parsed is None or parsed[0] != self.backend or not limits.tpm:
            return
        name, now = _bucket_name(principal), self._clock()
        if (name, "tok") not in self._buckets:
            return
        level = self._level(name, "tok", limits.tpm, now)
        self._store(name, "tok", min(limits.tpm, level + parsed[1] - max(0, actual_tokens)), now)

    def _prune(self) -> None:
        # a bucket untouched for a full window is full again, same as absent
        if len(self._buckets) < 10_000:
            return
        now = self._clock()
        stale = [k for k, b in self._buckets.items() if now - b.ts > 2 * WINDOW_S]
        for k in stale:
            del self._buckets[k]


def _decision(
    limits: Limits, allowed: bool, lr: float, lt: float, retry_s: float, backend: str, reserve: int
) -> RateLimitDecision:
    def reset(cap: int | None, level: float) -> float | None:
        return None if not cap else max(0.0, cap - level) * WINDOW_S / cap

    return RateLimitDecision(
        allowed=allowed,
        limit_requests=limits.rpm,
        remaining_requests=math.floor(lr) if limits.rpm else None,
        reset_requests_s=reset(limits.rpm, lr),
        limit_tokens=limits.tpm,
        remaining_tokens=math.floor(lt) if limits.tpm else None,
        reset_tokens_s=reset(limits.tpm, lt),
        retry_after_s=None if allowed else retry_s,
        reservation_id=_reservation(backend, reserve) if allowed else None,
    )


# --- Redis -----------------------------------------------------------------------------------------
class RedisRateLimiter:
    """Buckets in Redis, shared by every process using the same Redis and key prefix.

    Raises RedisUnavailable when Redis cannot answer; `FailoverRateLimiter` turns that into a
    per-process decision.
    """

    backend = "redis"

    def __init__(self, client: RedisClient, default_rpm: int, default_tpm: int) -> None:
        self.client = client
        self.default_rpm = default_rpm
        self.default_tpm = default_tpm
        self._admit = client.redis.register_script(_ADMIT_LUA)
        self._settle = client.redis.register_script(_SETTLE_LUA)

    def _keys(self, principal: Principal) -> list[str]:
        tag = "{" + _bucket_name(principal) + "}"  # hash tag keeps both buckets in one cluster slot
        return [self.client.key("rl", tag, "req"), self.client.key("rl", tag, "tok")]

    async def admit(self, principal: Principal, reserve_tokens: int) -> RateLimitDecision:
        limits = limits_for(principal, self.default_rpm, self.default_tpm)
        if limits.is_unlimited:
            return _unlimited()
        reserve = max(0, reserve_tokens)
        args = [limits.rpm or 0, limits.tpm or 0, reserve]
        keys = self._keys(principal)
        raw: Any = await self.client.run(lambda r: self._admit(keys=keys, args=args, client=r))
        allowed, lr, rr_ms, lt, rt_ms, retry_ms = (int(x) for x in raw)
        return RateLimitDecision(
            allowed=bool(allowed),
            limit_requests=limits.rpm,
            remaining_requests=lr if limits.rpm else None,
            reset_requests_s=rr_ms / 1000 if limits.rpm else None,
            limit_tokens=limits.tpm,
            remaining_tokens=lt if limits.tpm else None,
            reset_tokens_s=rt_ms / 1000 if limits.tpm else None,
            retry_after_s=None if allowed else retry_ms / 1000,
            reservation_id=_reservation(self.backend, reserve) if allowed else None,
        )

    async def settle(self, principal: Principal, decision: RateLimitDecision, actual_tokens: int) -> None:
        parsed = _parse_reservation(decision)
        limits = limits_for(principal, self.default_rpm, self.default_tpm)
        if parsed is None or parsed[0] != self.backend or not limits.tpm:
            return
        delta = parsed[1] - max(0, actual_tokens)
        if delta == 0:
            return
        keys, args = self._keys(principal)[1:], [limits.tpm, delta]
        await self.client.run(lambda r: self._settle(keys=keys, args=args, client=r))


class FailoverRateLimiter:
    """Redis when it answers, per-process buckets while it does not (the breaker decides)."""

    def __init__(self, primary: RedisRateLimiter, fallback: LocalRateLimiter) -> None:
        self.primary = primary
        self.fallback = fallback

    async def admit(self, principal: Principal, reserve_tokens: int) -> RateLimitDecision:
        try:
            return await self.primary.admit(principal, reserve_tokens)
        except RedisUnavailable:
            return await self.fallback.admit(principal, reserve_tokens)

    async def settle(self, principal: Principal, decision: RateLimitDecision, actual_tokens: int) -> None:
        parsed = _parse_reservation(decision)
        if parsed is None:
            return
        if parsed[0] == self.fallback.backend:
            await self.fallback.settle(principal, decision, actual_tokens)
            return
        try:
            await self.primary.settle(principal, decision, actual_tokens)
        except RedisUnavailable:
            pass  # the refund is lost; the bucket refills within a window anyway


def build_rate_limiter(settings: Settings, client: RedisClient | None) -> LocalRateLimiter | FailoverRateLimiter:
    local = LocalRateLimiter(settings.default_rpm, settings.default_tpm)
    if client is None:
        return local
    return FailoverRateLimiter(RedisRateLimiter(client, settings.default_rpm, settings.default_tpm), local)
