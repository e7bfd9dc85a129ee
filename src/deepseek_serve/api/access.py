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
Both counters live in Redis when `DS_REDIS_URL` is set, so every worker and replica shares one
budget, and in this process otherwise or while Redis is down (cache/guards.py).
"""

from __future__ import annotations

import ipaddress
import logging

from starlette.types import ASGIApp, Receive, Scope, Send

from deepseek_serve.api.error_handlers import error_response
from deepseek_serve.cache.guards import AuthThrottle, KeyConcurrency, LocalAuthThrottle
from deepseek_serve.config import Settings
from deepseek_serve.contracts import AuthThrottle as Throttle
from deepseek_serve.contracts import ConcurrencyGate, Principal
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
        # in-process guards for an app whose services bring none (the cache layer builds shared ones)
        per_min = settings.auth_failures_per_min
        self.throttle: Throttle | None = AuthThrottle(LocalAuthThrottle(per_min)) if per_min > 0 else None
        self.concurrency: ConcurrencyGate = KeyConcurrency(settings.max_concurrent_per_key)

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
        # the cache layer's guards when it built them (its throttle is None when the throttle is off)
        shared_guards = services.key_concurrency is not None
        throttle = services.auth_throttle if shared_guards else self.throttle
        if throttle is not None:
            wait = await throttle.retry_after(address)
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
            if throttle is not None:
                await throttle.record_failure(address)
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
        gate = services.key_concurrency or self.concurrency
        lease = await gate.try_acquire(key_id)
        if lease is None:
            if services.metrics is not None:
                services.metrics.rejected("rate_limited")
            await self._refuse(
                scope,
                receive,
                send,
                RateLimitError(
                    f"Too many concurrent requests for this API key (the limit is {gate.limit}). "
                    "Retry after the indicated time.",
                    1.0,
                    code="concurrency_limit_exceeded",
                ),
            )
            return
        try:
            await self.app(scope, receive, send)
        finally:
            await gate.release(lease)

    @staticmethod
    def _count_rejection(services: Services) -> None:
        if services.metrics is not None:
            services.metrics.rejected("auth")

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, err: ApiError) -> None:
        extra = {"Connection": "close"} if _has_body(scope) else None
        await error_response(err, extra)(scope, receive, send)
