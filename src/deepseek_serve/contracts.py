"""Value types and protocols shared by the layers: who is calling (`Principal`), what a rate limit
decided (`RateLimitDecision`), what a finished request cost (`UsageEvent`), and the small protocols
that storage, cache and observability implement for the API (`Authenticator`, `UsageSink`,
`ConversationStore`, `RateLimiter`, `ResponseCache`, `Metrics`).
The storage and cache layers report their state to metrics through `StateReporter`
(`metrics_snapshot()` returning `StorageState` / `CacheState`).

Imports nothing of this package, so `api`, `cache`, `storage` and `observability` can all import it
(tests/test_layering.py keeps that true).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, TypeVar


# --- identity ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Principal:
    """Who is calling. `key_id` is the API key's database id; None when auth is off (anonymous, all
    scopes)."""

    key_id: int | None
    name: str = "anonymous"
    scopes: frozenset[str] = frozenset({"inference", "admin"})
    rpm_limit: int | None = None  # None = settings default
    tpm_limit: int | None = None

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes


class Authenticator(Protocol):
    async def authenticate(self, authorization: str | None) -> Principal:
        """Return the caller for an `Authorization` header value; raise serving.failures.AuthError (401)."""
        ...


# --- usage ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UsageEvent:
    request_id: str
    key_id: int | None
    model: str
    endpoint: str  # "chat.completions" | "completions"
    status: int  # HTTP status sent (200 for a stream that started)
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    queue_ms: float | None = None
    first_token_ms: float | None = None
    total_ms: float | None = None
    prompt_text: str | None = None  # only filled when settings.store_content
    completion_text: str | None = None
    created_at: float = 0.0  # time.time()


class UsageSink(Protocol):
    def record(self, event: UsageEvent) -> None:
        """Queue a record; never blocks, never raises (records are written later, in batches)."""
        ...

    async def persisted(self, timeout_s: float) -> bool:
        """Wait (at most `timeout_s`) until every record queued so far is stored durably."""
        ...


class ConversationStore(Protocol):
    async def history(self, principal: Principal, conversation_id: str) -> list[dict[str, Any]]:
        """Messages of a conversation owned by `principal` (OpenAI message dicts); 404 error if not theirs."""
        ...

    async def append_turn(
        self,
        principal: Principal,
        conversation_id: str,
        user_messages: list[dict[str, Any]],
        answer: dict[str, Any],
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None: ...


# --- limits and cache -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RateLimitDecision:
    allowed: bool
    limit_requests: int | None
    remaining_requests: int | None
    reset_requests_s: float | None
    limit_tokens: int | None
    remaining_tokens: int | None
    reset_tokens_s: float | None
    retry_after_s: float | None = None
    reservation_id: str | None = None  # pass back to `settle`

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers (only the limits that are set)."""
        out: dict[str, str] = {}
        if self.limit_requests is not None:
            out["x-ratelimit-limit-requests"] = str(self.limit_requests)
            out["x-ratelimit-remaining-requests"] = str(max(self.remaining_requests or 0, 0))
            out["x-ratelimit-reset-requests"] = f"{self.reset_requests_s or 0:.3f}s"
        if self.limit_tokens is not None:
            out["x-ratelimit-limit-tokens"] = str(self.limit_tokens)
            out["x-ratelimit-remaining-tokens"] = str(max(self.remaining_tokens or 0, 0))
            out["x-ratelimit-reset-tokens"] = f"{self.reset_tokens_s or 0:.3f}s"
        return out


RATE_LIMIT_HEADERS = tuple(
    f"x-ratelimit-{kind}-{unit}" for unit in ("requests", "tokens") for kind in ("limit", "remaining", "reset")
)


class RateLimiter(Protocol):
    async def admit(self, principal: Principal, reserve_tokens: int) -> RateLimitDecision:
        """Count one request and reserve `reserve_tokens` (prompt + max_tokens) atomically."""
        ...

    async def settle(self, principal: Principal, decision: RateLimitDecision, actual_tokens: int) -> None:
        """Correct the reservation to the tokens really used."""
        ...


class AuthThrottle(Protocol):
    """Failed authentications per client address (api/access.py asks before it looks a key up)."""

    async def retry_after(self, address: str) -> float | None:
        """Seconds until `address` may try again, or None when it may try now."""
        ...

    async def record_failure(self, address: str) -> None: ...


class ConcurrencyGate(Protocol):
    """In-flight requests per API key, at most `limit` each (0 = no limit)."""

    limit: int

    async def try_acquire(self, key_id: int) -> Any | None:
        """A lease to hand back to `release`, or None when the key is at its limit."""
        ...

    async def release(self, lease: Any) -> None: ...


class ResponseCache(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes) -> None: ...


# --- metrics ----------------------------------------------------------------------------------------
class Metrics(Protocol):
    def observe_request(
        self,
        *,
        endpoint: str,
        finish_reason: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int,
        queue_s: float | None,
        ttft_s: float | None,
        e2e_s: float | None,
        itl_s: list[float],
    ) -> None: ...

    def rejected(self, reason: str) -> None:
        """reason: queue_full | rate_limited | timeout | auth"""
        ...

    def response_cache(self, hit: bool) -> None: ...


# --- component state for metrics --------------------------------------------------------------------
T_co = TypeVar("T_co", covariant=True)


class StateReporter(Protocol[T_co]):
    """A component that reports its state to metrics: `metrics_snapshot()` returns a frozen value,
    cheap enough to call at every scrape and from any thread, never raising for a missing backend."""

    def metrics_snapshot(self) -> T_co: ...


@dataclass(frozen=True)
class DatabasePoolState:
    """A database connection pool: connections it keeps, checked out now, open beyond `size` now,
    and the overflow it allows."""

    size: int
    in_use: int
    overflow: int
    max_overflow: int


@dataclass(frozen=True)
class UsageWriterState:
    """The usage writer: records spooled on disk, records in memory (queued or being written),
    whether the database answers, and what became of the records so far."""

    spool_backlog: int
    queue_depth: int
    database_reachable: bool
    written_total: int
    spooled_total: int
    rejected_total: int


@dataclass(frozen=True)
class StorageState:
    """The storage layer; `pool` is None for a pool that does not count connections."""

    pool: DatabasePoolState | None
    usage: UsageWriterState


@dataclass(frozen=True)
class CacheState:
    """The cache layer; `redis_circuit_state` is the Redis breaker (0 closed, 1 half-open, 2 open),
    None when running without Redis."""

    redis_circuit_state: int | None
