"""Dependencies as named types, so route signatures read like prose."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Header, Request

from deepseek_serve.contracts import Principal
from deepseek_serve.engine.async_engine import AsyncEngine
from deepseek_serve.observability.logs import bind_log_fields
from deepseek_serve.serving.failures import AuthError, PermissionDeniedError
from deepseek_serve.serving.services import Services

ANONYMOUS = Principal(key_id=None)


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_engine(services: ServicesDep) -> AsyncEngine:
    return services.engine


EngineDep = Annotated[AsyncEngine, Depends(get_engine)]


async def get_principal(
    request: Request, services: ServicesDep, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    """The caller: the principal `api/access.py:AccessMiddleware` authenticated from the headers,
    else `services.auth.authenticate(header)` when auth is on, else the anonymous principal (all
    scopes). Raises AuthError (401) through the authenticator."""
    checked: Principal | None = request.scope.get("state", {}).get("principal")
    if checked is not None:
        return checked
    if services.auth is not None and services.settings.auth_enabled:
        try:
            principal = await services.auth.authenticate(authorization)
        except AuthError:
            if services.metrics is not None:
                services.metrics.rejected("auth")
            raise
        bind_log_fields(key_id=None if principal.key_id is None else str(principal.key_id))
        return principal
    return ANONYMOUS


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require_scope(scope: str) -> Callable[[Principal], Awaitable[Principal]]:
    """Dependency factory: the caller must hold `scope`, else 403."""

    async def check(principal: PrincipalDep) -> Principal:
        if not principal.has_scope(scope):
            raise PermissionDeniedError(f"This API key lacks the '{scope}' scope required for this endpoint.")
        return principal

    return check


AdminDep = Annotated[Principal, Depends(require_scope("admin"))]
InferenceDep = Annotated[Principal, Depends(require_scope("inference"))]
