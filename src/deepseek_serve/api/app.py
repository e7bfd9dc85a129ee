"""The app factory. `create_app(settings)` returns a FastAPI app whose lifespan owns the engine.

Request path: middleware (metrics, request id, CORS, access, body limit, unhandled errors) ->
`api/routes/<resource>.py` (routers listed in `api/routes/__init__.py`) -> `api/deps.py` ->
`serving/` (`serving/generate.py:serve_generation` for completions) -> `AsyncEngine`.

Other layers plug in at two places: `build_services` (fill a `Services` slot) and the router list.
No module-level state: everything a request needs hangs off `app.state.services`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI
from starlette.middleware.cors import CORSMiddleware

from deepseek_serve.api.access import AccessMiddleware
from deepseek_serve.api.error_handlers import install_error_handlers
from deepseek_serve.api.middleware import (
    BodySizeLimitMiddleware,
    RequestIdMiddleware,
    UnhandledErrorMiddleware,
    install_log_record_factory,
)
from deepseek_serve.api.openapi import install_openapi
from deepseek_serve.api.roles import EngineSecretMiddleware, load_router
from deepseek_serve.config import Settings, load_settings
from deepseek_serve.contracts import RATE_LIMIT_HEADERS
from deepseek_serve.engine.async_engine import AsyncEngine
from deepseek_serve.observability.metrics import PrometheusMetrics
from deepseek_serve.observability.middleware import HTTPMetricsMiddleware
from deepseek_serve.serving.services import Services

logger = logging.getLogger(__name__)


async def build_services(settings: Settings, engine: AsyncEngine) -> Services:
    """Build every optional service. Each layer fills its own slot below with a small edit; a slot
    left None switches the feature off. Resources to close at shutdown go into `services.extras`
    (anything with `aclose()` or `close()`)."""
    services = Services(settings=settings, engine=engine)
    if settings.role == "engine":  # behind a gateway: no keys, limits, usage, cache or conversations
        metrics = PrometheusMetrics()
        metrics.attach(engine)
        services.metrics = metrics
        services.extras["metrics"] = metrics
        return services
    # --- storage: services.auth, services.usage, services.conversations ---------
    from deepseek_serve.api.auth import ApiKeyAuthenticator
    from deepseek_serve.api.routes.conversations import StoredConversations
    from deepseek_serve.storage import Storage

    storage = Storage(settings)
    await storage.start()  # migrates when DS_DB_AUTO_MIGRATE, upserts DS_ADMIN_KEY, replays the spool
    services.extras["storage"] = storage  # closed last: flushes queued usage (or spools it)
    # built even when auth is off for /v1: with DS_AUTH=auto on loopback /admin still needs a key.
    services.auth = ApiKeyAuthenticator(storage.key_lookup)
    services.usage = storage.writer
    services.conversations = StoredConversations(storage.conversations, settings.max_messages)
    # --- cache: services.limiter, response_cache, auth_throttle, key_concurrency -------------------
    from deepseek_serve.cache import build_cache_layer

    cache_layer = build_cache_layer(settings)
    services.limiter = cache_layer.limiter
    services.response_cache = cache_layer.response_cache
    services.auth_throttle = cache_layer.auth_throttle
    services.key_concurrency = cache_layer.key_concurrency
    services.extras["cache"] = cache_layer  # .breaker: the Redis circuit breaker (None without Redis)
    # --- observability: services.metrics -----------------------------------------
    metrics = PrometheusMetrics()
    metrics.attach(engine, storage=storage, cache=cache_layer)
    services.metrics = metrics
    services.extras["metrics"] = metrics
    if settings.role == "gateway":
        from deepseek_serve.gateway.engine import GatewayEngine
        from deepseek_serve.gateway.metrics import UpstreamCollector

        if isinstance(engine, GatewayEngine):
            metrics.registry.register(UpstreamCollector(engine.pool.upstreams))
    return services


async def close_services(services: Services) -> None:
    """Close what `build_services` opened, last opened first; errors are logged, not raised."""
    for name, resource in reversed(list(services.extras.items())):
        try:
            closer: Any = getattr(resource, "aclose", None)
            if closer is not None:
                await closer()
                continue
            closer = getattr(resource, "close", None)
            if closer is not None:
                result = closer()
                if hasattr(result, "__await__"):
                    await result
        except Exception:
            logger.exception("closing %s failed", name)


def create_app(settings: Settings, engine: AsyncEngine | None = None) -> FastAPI:
    """The ASGI app. Without `engine` the lifespan loads the model from `settings` and shuts it
    down on exit; a passed engine is started if needed and left running (the caller owns it)."""
    from deepseek_serve.api.routes import api_routers

    install_log_record_factory()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owns_engine = engine is None
        active = _build_engine(settings) if engine is None else engine
        await active.start()
        services = await build_services(settings, active)
        app.state.services = services
        logger.info("serving model %s (%s)", active.model_info.id, active.model_info.runner)
        try:
            yield
        finally:
            if owns_engine:
                await active.shutdown(settings.drain_timeout_s)
            await close_services(services)

    app = FastAPI(
        title="deepseek-serve",
        summary="OpenAI-compatible API for small DeepSeek chat models",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    for router in routers_for(settings.role, api_routers):
        app.include_router(router)
    install_openapi(app)
    # add_middleware prepends: the last added is the outermost. Outside in: metrics, request id,
    # CORS, access (key, before the body), body limit, unhandled errors; so a 401, 413 or 500 still gets
    # the request id and CORS headers.
    app.add_middleware(UnhandledErrorMiddleware)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(AccessMiddleware, settings=settings)
    if settings.role == "engine" and settings.engine_secret:
        app.add_middleware(EngineSecretMiddleware, secret=settings.engine_secret)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            # what a browser client may read: request id, cache hit, and the rate-limit state
            expose_headers=["x-request-id", "x-cache", "retry-after", *RATE_LIMIT_HEADERS],
            allow_credentials="*" not in settings.cors_origins,
        )
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(HTTPMetricsMiddleware)
    return app


def _build_engine(settings: Settings) -> AsyncEngine:
    if settings.role == "gateway":
        from deepseek_serve.gateway.engine import GatewayEngine

        return GatewayEngine.from_settings(settings)
    from deepseek_serve.engine.process import ProcessEngine, connect_from_env, use_engine_process

    if settings.role in ("all", "engine"):
        shared = connect_from_env()  # a worker of `serve --workers N` over one engine process
        if shared is not None:
            return shared
    if use_engine_process(settings):
        from deepseek_serve.observability.logs import uvicorn_log_config

        return ProcessEngine.from_settings(settings, log_config=uvicorn_log_config(settings))
    return AsyncEngine.from_settings(settings)


def routers_for(role: str, routers: list[APIRouter]) -> list[APIRouter]:
    """The routers a role serves (see api/roles.py)."""
    if role == "engine":
        from deepseek_serve.api.routes import chat, completions, health, metrics, models

        keep = {id(r) for r in (health.router, models.router, chat.router, completions.router, metrics.router)}
        return [r for r in routers if id(r) in keep] + [load_router]
    if role == "gateway":
        from deepseek_serve.api.routes.upstreams import router as upstreams_router

        return [*routers, upstreams_router]
    return list(routers)


def create_app_from_env() -> FastAPI:
    """Uvicorn factory (`deepseek_serve.api.app:create_app_from_env`): each worker reads `DS_*`."""
    return create_app(load_settings())
