"""The services a request may touch, gathered in one `Services` object.

The app factory builds one `Services` in its lifespan and stores it on `app.state.services`;
routes reach it through `ServicesDep` (api/deps.py). Each layer fills its slots with an
implementation of a protocol from `deepseek_serve.contracts`:

- storage: `auth`, `usage`, `conversations`
- cache: `limiter`, `response_cache`, `auth_throttle`, `key_concurrency`
- observability: `metrics`

A slot left `None` means the feature is off; the request path works with every slot `None`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deepseek_serve.contracts import (
    Authenticator,
    AuthThrottle,
    ConcurrencyGate,
    ConversationStore,
    Metrics,
    RateLimiter,
    ResponseCache,
    UsageSink,
)

if TYPE_CHECKING:
    from deepseek_serve.config import Settings
    from deepseek_serve.engine.async_engine import AsyncEngine


@dataclass
class Services:
    settings: Settings
    engine: AsyncEngine
    auth: Authenticator | None = None
    usage: UsageSink | None = None
    conversations: ConversationStore | None = None
    limiter: RateLimiter | None = None
    response_cache: ResponseCache | None = None
    auth_throttle: AuthThrottle | None = None
    key_concurrency: ConcurrencyGate | None = None
    metrics: Metrics | None = None
    extras: dict[str, Any] = field(default_factory=dict)  # owned resources to close (db engine, redis pool)
