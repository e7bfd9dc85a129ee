"""GET /admin/upstreams (admin scope): the gateway's upstreams, their breaker state and load."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from deepseek_serve.api.deps import AdminDep, EngineDep
from deepseek_serve.serving.failures import NotFoundError

router = APIRouter(prefix="/admin", tags=["gateway"])


@router.get("/upstreams")
async def list_upstreams(engine: EngineDep, principal: AdminDep) -> dict[str, Any]:
    """State of every upstream: healthy / ejected / unknown, load, in-flight, failures, last report."""
    state = getattr(engine, "upstreams_state", None)
    if state is None:
        raise NotFoundError("This server is not a gateway (DS_ROLE=gateway).")
    return {"object": "list", "data": state()}
