"""`AccessMiddleware`: who may call `/v1` and `/admin`, decided from the headers alone.

It runs before any route, so a request without a valid key is refused before its body is read,
parsed or validated (FastAPI reads the body before it resolves dependencies). In order:

1. Only `/v1/...` and `/admin/...` are guarded; health, metrics and docs pass through.
2. Which calls need a key: every guarded one when auth is on; with `DS_AUTH=auto` on a loopback
   bind, `/admin` still does (a reverse proxy on the same host makes loopback no trust boundary);
   with `DS_AUTH=off` none.
3. A client address (IPv6: its /64) with `DS_AUTH_FAILURES_PER_MIN` failed authentications in
   the last minute gets 429 + Retry-After before any key lookup. Each failure is logged with the
   address and the reason, never the key.
4. The key must hold the scope of the prefix: `admin` for `/admin`, `inference` for `/v1` (403).
5. A key may have `DS_MAX_CONCURRENT_PER_KEY` requests in flight (a stream counts until it ends);
   one more gets 429 + Retry-After.

The principal goes into `scope["state"]["principal"]`, where `api/deps.py:get_principal` finds it.
A refusal of a request that carries a body closes the connection, so the unread body is dropped.
Both counters are per process (with N workers an address or a key gets up to N times as much).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from deepseek_serve.api.error_handlers import error_response
from deepseek_serve.config import Settings
from deepseek_serve.contracts import Principal
from deepseek_serve.observability.logs import bind_log_fields
from deepseek_serve.serving.failures import ApiError, AuthError, PermissionDeniedError, RateLimitError
from deepseek_serve.serving.services import Services

logger = logging.getLogger(__name__)

GUARDED_PREFIXES = {"/v1": "inference", "/admin": "admin"}


def required_scope(path: str) -> str | None:
    """The scope a path needs, or None when the path is not guarded."""
    for prefix, scope in GUARDED_PREFIXES.items():
        if path == prefix or path.startswith(prefix + "/"):
            return scope
    return None


def client_address(scope: Scope) -> str:
    """The caller's address as throttling sees it: IPv4 as is, IPv6 as its /64 network (one host
    usually owns a whole /64), `unknown` for a Unix socket."""
    client = scope.get("client")
    if not client:
        return "unknown"
    host = str(client[0])
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host[:64]
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return host


@dataclass
class _Bucket:
    level: float
    updated: float


class AuthFailureThrottle:
    """A token bucket of failed authentications per client address: capacity `per_min`, refilled
    at `per_min / 60` a second. Addresses are kept LRU, at most `max_addresses` of them, so memory
    stays bounded whatever addresses an attacker uses (an evicted address starts afresh)."""

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

    def retry_after(self, address: str) -> float | None:
        """Seconds until `address` may try again, or None when it may try now."""
        bucket = self._refilled(address)
        if bucket is None or bucket.level >= 1.0:
            return None
        return (1.0 - bucket.level) / self.rate

    def record_failure(self, address: str) -> None:
        bucket = self._refilled(address)
        if bucket is None:
            bucket = _Bucket(self.capacity, self._clock())
            self._buckets[address] = bucket
            while len(self._buckets) > self.max_addresses:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(address)
        bucket.level = max(bucket.level - 1.0, 0.0)


class KeyConcurrency:
    """In-flight requests per API key id, at most `limit` each (0 = no limit)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._in_flight: dict[int, int] = {}

    def try_acquire(self, key_id: int) -> bool:
        count = self._in_flight.get(key_id, 0)
        if self.limit and count >= self.limit:
            return False
        self._in_flight[key_id] = count + 1
        return True

    def release(self, key_id: int) -> None:
        count = self._in_flight.get(key_id, 0) - 1
        if count > 0:
            self._in_flight[key_id] = count
        else:
            self._in_flight.pop(key_id, None)

    def in_flight(self, key_id: int) -> int:
        return self._in_flight.get(key_id, 0)


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0")):
            return True
    return False


def _authorization(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            return value.decode("latin-1")
    return None


class AccessMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        per_min = settings.auth_failures_per_min
        self.throttle = AuthFailureThrottle(per_min) if per_min > 0 else None
        self.concurrency = KeyConcurrency(settings.max_concurrent_per_key)

    def _needs_key(self, scope_name: str) -> bool:
        if self.settings.auth_enabled:
            return True
        return scope_name == "admin" and self.settings.auth == "auto"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        needed = required_scope(scope["path"])
        if needed is None or not self._needs_key(needed):
            await self.app(scope, receive, send)
            return
        services: Services | None = getattr(scope["app"].state, "services", None)
        if services is None:
            await self._refuse(
                scope, receive, send, AuthError("API keys cannot be checked on this server.", code="auth_unavailable")
            )
            return
        if services.auth is None:
            # no key store in this process: an engine behind a gateway (DS_ROLE=engine), which checks the
            # keys; the engine's own gate is the shared secret (api/roles.py)
            await self.app(scope, receive, send)
            return
        address = client_address(scope)
        if self.throttle is not None:
            wait = self.throttle.retry_after(address)
            if wait is not None:
                self._count_rejection(services)
                await self._refuse(
                    scope,
                    receive,
                    send,
                    RateLimitError(
                        "Too many failed authentications from your address. Retry after the indicated time.",
                        wait,
                        code="too_many_auth_failures",
                    ),
                )
                return
        try:
            principal = await services.auth.authenticate(_authorization(scope))
        except AuthError as err:
            if self.throttle is not None:
                self.throttle.record_failure(address)
            self._count_rejection(services)
            # the path is percent-decoded client input: repr() escapes control characters, and it is bounded
            logger.warning(
                "authentication failed (%s) from %s: %s %r", err.code, address, scope["method"], scope["path"][:200]
            )
            await self._refuse(scope, receive, send, err)
            return
        except ApiError as err:  # 503: the key store is unreachable
            await self._refuse(scope, receive, send, err)
            return
        bind_log_fields(key_id=None if principal.key_id is None else str(principal.key_id))
        if not principal.has_scope(needed):
            await self._refuse(
                scope,
                receive,
                send,
                PermissionDeniedError(f"This API key lacks the '{needed}' scope required for this endpoint."),
            )
            return
        await self._call_as(principal, scope, receive, send, services)

    async def _call_as(
        self, principal: Principal, scope: Scope, receive: Receive, send: Send, services: Services
    ) -> None:
        scope.setdefault("state", {})["principal"] = principal
        key_id = principal.key_id
        if key_id is None:
            await self.app(scope, receive, send)
            return
        if not self.concurrency.try_acquire(key_id):
            if services.metrics is not None:
                services.metrics.rejected("rate_limited")
            await self._refuse(
                scope,
                receive,
                send,
                RateLimitError(
                    f"Too many concurrent requests for this API key (the limit is {self.concurrency.limit}). "
                    "Retry after the indicated time.",
                    1.0,
                    code="concurrency_limit_exceeded",
                ),
            )
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.concurrency.release(key_id)

    @staticmethod
    def _count_rejection(services: Services) -> None:
        if services.metrics is not None:
            services.metrics.rejected("auth")

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, err: ApiError) -> None:
        extra = {"Connection": "close"} if _has_body(scope) else None
        await error_response(err, extra)(scope, receive, send)
