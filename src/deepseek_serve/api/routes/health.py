"""Liveness and readiness.

- `/health/live`: the process answers.
- `/health/ready` (and `/health`): the engine accepts work and either made progress within
  `_PROGRESS_WINDOW_S` or, when it has been idle, a one-token probe succeeds (cached for
  `_PROBE_TTL_S` so frequent checks do not load the engine). 503 otherwise.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from deepseek_serve.api.deps import EngineDep
from deepseek_serve.engine.async_engine import AsyncEngine

router = APIRouter(tags=["health"])

_PROGRESS_WINDOW_S = 30.0
_PROBE_TTL_S = 5.0
_PROBE_TIMEOUT_S = 10.0


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return Response(
        orjson.dumps(body), status_code=status, media_type="application/json", headers={"Cache-Control": "no-store"}
    )


async def _probe(request: Request, engine: AsyncEngine) -> bool:
    """One probe at a time per app; concurrent checks share the cached result."""
    state = request.app.state
    if not hasattr(state, "probe_lock"):
        state.probe_lock = asyncio.Lock()
        state.probe_result = (0.0, False)
    async with state.probe_lock:
        checked_at, ok = state.probe_result
        if time.monotonic() - checked_at < _PROBE_TTL_S:
            return bool(ok)
        ok = await engine.probe(_PROBE_TIMEOUT_S)
        state.probe_result = (time.monotonic(), ok)
        return ok


async def readiness(request: Request, engine: EngineDep) -> Response:
    stats = engine.stats()
    now = time.monotonic()
    body: dict[str, Any] = {
        "status": "ready",
        "model": engine.model_info.id,
        "num_running": stats.num_running,
        "num_waiting": stats.num_waiting,
        "max_batch_size": stats.max_batch_size,
        "max_queue_size": stats.max_queue_size,
        "kv_used_tokens": stats.kv_used_tokens,
        "kv_cached_tokens": stats.kv_cached_tokens,
        "kv_capacity_tokens": stats.kv_capacity_tokens,
        "steps_total": stats.steps_total,
        "seconds_since_last_step": (round(now - stats.last_step_monotonic, 3) if stats.last_step_monotonic else None),
    }
    if not stats.is_running or not engine.is_accepting:
        body["status"] = "unavailable"
        body["reason"] = "engine is starting or shutting down"
        return _json(body, 503)
    recent = stats.last_step_monotonic > 0 and now - stats.last_step_monotonic < _PROGRESS_WINDOW_S
    busy = stats.num_running + stats.num_waiting > 0
    if recent:
        return _json(body)
    if busy:
        body["status"] = "unavailable"
        body["reason"] = f"engine has work but made no progress for {_PROGRESS_WINDOW_S:.0f}s"
        return _json(body, 503)
    if await _probe(request, engine):
        return _json(body)
    body["status"] = "unavailable"
    body["reason"] = "one-token probe failed"
    return _json(body, 503)


@router.get("/health/live")
async def live() -> Response:
    """200 while the process answers."""
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/health/ready")
async def ready(request: Request, engine: EngineDep) -> Response:
    """200 when the model is loaded and the engine makes progress; 503 otherwise. Body: engine stats."""
    return await readiness(request, engine)


@router.get("/health")
async def health(request: Request, engine: EngineDep) -> Response:
    """Same as /health/ready."""
    return await readiness(request, engine)
