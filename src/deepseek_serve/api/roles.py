"""What `DS_ROLE` changes in the app: the routers, the shared-secret gate of an engine, and the
engine's load report.

- `all`: every router; the local engine.
- `engine`: the OpenAI-compatible generation routes, health, metrics and `GET /internal/load`;
  no keys, limits, usage, cache or conversations. `/v1/*` and `/internal/*` require
  `Authorization: Bearer <DS_ENGINE_SECRET>` when the secret is set (health probes and
  `/metrics`, behind `DS_METRICS_TOKEN`, do not).
- `gateway`: every router plus `GET /admin/upstreams`; the engine is a `GatewayEngine`.
"""

from __future__ import annotations

import hmac
from typing import Any

import orjson
from fastapi import APIRouter
from fastapi.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from deepseek_serve.api.deps import EngineDep
from deepseek_serve.api.middleware import send_error
from deepseek_serve.engine import prefix_summary
from deepseek_serve.serving.failures import AuthError

_GATED_PREFIXES = ("/v1/", "/v1", "/internal/")

load_router = APIRouter(tags=["engine"])


@load_router.get("/internal/load")
async def load_report(engine: EngineDep) -> Response:
    """The engine's load and prefix-cache summary, read by gateways for routing and health."""
    stats = engine.stats()
    queries = stats.prefix_cache_queries_tokens_total
    body: dict[str, Any] = {
        "model": engine.model_info.id,
        "ready": stats.is_running and engine.is_accepting,
        "running": stats.num_running,
        "waiting": stats.num_waiting,
        "max_batch_size": stats.max_batch_size,
        "max_queue_size": stats.max_queue_size,
        "max_model_len": engine.model_info.max_model_len,
        "kv_used_tokens": stats.kv_used_tokens,
        "kv_capacity_tokens": stats.kv_capacity_tokens,
        "kv_cached_tokens": stats.kv_cached_tokens,
        "prefix_cache": {
            "cached_tokens": stats.kv_cached_tokens,
            "queries_tokens_total": queries,
            "hits_tokens_total": stats.prefix_cache_hits_tokens_total,
            "hit_rate": round(stats.prefix_cache_hits_tokens_total / queries, 4) if queries else None,
            # what it holds: chained digests of token blocks (engine/prefix_summary.py), for routing
            "scheme": prefix_summary.SCHEME,
            "blocks": engine.prefix_cache_summary(),
        },
        "prompt_tokens_total": stats.prompt_tokens_total,
        "generation_tokens_total": stats.generation_tokens_total,
    }
    return Response(orjson.dumps(body), media_type="application/json", headers={"Cache-Control": "no-store"})


class EngineSecretMiddleware:
    """401 in OpenAI's error shape unless the bearer token equals the secret (constant-time)."""

    def __init__(self, app: ASGIApp, secret: str) -> None:
        self.app = app
        self.expected = f"Bearer {secret}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith(_GATED_PREFIXES):
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        await send_error(
            send,
            AuthError("This engine accepts requests from its gateway only (shared secret).", "invalid_engine_secret"),
        )
