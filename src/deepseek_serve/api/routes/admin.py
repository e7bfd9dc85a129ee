"""Admin API (admin scope): API keys and usage.

POST /admin/keys (the secret is in the response, once), GET /admin/keys, DELETE /admin/keys/{id}
(revoke; takes effect at once in this process, within `DS_KEY_CACHE_TTL_S` in others),
GET /admin/usage?group_by=day,model&key_id=&since=&until=.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from deepseek_serve.api.deps import AdminDep
from deepseek_serve.api.routes.conversations import StorageDep
from deepseek_serve.serving.failures import ApiError, NotFoundError
from deepseek_serve.serving.schemas import INT32_MAX, Text
from deepseek_serve.storage import retention
from deepseek_serve.storage.models import ALL_SCOPES, SCOPE_INFERENCE
from deepseek_serve.storage.retention import parse_duration
from deepseek_serve.storage.usage import GROUP_BY_FIELDS

router = APIRouter(prefix="/admin", tags=["admin"])


def bad_param(param: str, message: str) -> ApiError:
    return ApiError(400, f"Invalid value for '{param}': {message}", "invalid_request_error", param, "invalid_value")


def parse_since(value: str, param: str) -> datetime:
    """A duration back from now (`7d`, `12h`) or an ISO date/datetime (UTC)."""
    try:
        return retention.parse_since(value)
    except ValueError as exc:
        raise bad_param(param, str(exc)) from None


MAX_KEY_ID = 2**63 - 1  # BIGINT


def parse_key_id(value: str, param: str = "key_id") -> int:
    value = value.strip()
    if not value.isascii() or not value.isdigit() or len(value) > 19 or not 1 <= int(value) <= MAX_KEY_ID:
        raise bad_param(param, f"'{value[:40]}' is not a key id (a positive integer, see GET /admin/keys)")
    return int(value)


class CreateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Text = Field(min_length=1, max_length=128)
    scopes: list[Annotated[Text, Field(max_length=32)]] = Field(
        default_factory=lambda: [SCOPE_INFERENCE],
        min_length=1,
        max_length=len(ALL_SCOPES),
        description=f"any of {list(ALL_SCOPES)}",
    )
    rpm_limit: int | None = Field(None, ge=0, le=INT32_MAX, description="requests per minute; null = server default")
    tpm_limit: int | None = Field(None, ge=0, le=INT32_MAX, description="tokens per minute; null = server default")
    expires_in: Text | None = Field(
        None, max_length=32, description="lifetime such as 30d or 12h (at most 100 years); null = never expires"
    )


@router.post("/keys", status_code=201)
async def create_key(body: CreateKeyRequest, storage: StorageDep, principal: AdminDep) -> dict[str, Any]:
    """Create a key. The response's `key` holds the secret: it is shown this once and never stored."""
    unknown = sorted(set(body.scopes) - set(ALL_SCOPES))
    if unknown:
        raise bad_param("scopes", f"unknown scope(s) {unknown}; valid scopes: {list(ALL_SCOPES)}")
    expires_in = None
    if body.expires_in is not None:
        try:
            expires_in = parse_duration(body.expires_in)
        except ValueError as exc:
            raise bad_param("expires_in", str(exc)) from None
    created = await storage.keys.create(
        body.name, scopes=body.scopes, rpm_limit=body.rpm_limit, tpm_limit=body.tpm_limit, expires_in=expires_in
    )
    return {**created.info.to_dict(), "key": created.secret}


@router.get("/keys")
async def list_keys(storage: StorageDep, principal: AdminDep, include_revoked: bool = False) -> dict[str, Any]:
    """All keys (without secrets or hashes); revoked ones only with `include_revoked=true`."""
    keys = await storage.keys.list(include_revoked=include_revoked)
    return {"object": "list", "data": [k.to_dict() for k in keys]}


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, storage: StorageDep, principal: AdminDep) -> dict[str, Any]:
    """Revoke a key (idempotent); 404 when there is no such key."""
    info = await storage.keys.revoke(parse_key_id(key_id, "key_id"))
    if info is None:
        raise NotFoundError(f"No API key with id '{key_id}'.", param="key_id", code="key_not_found")
    storage.key_lookup.invalidate(info.id)
    return {**info.to_dict(), "revoked": True}


@router.get("/usage")
async def usage_summary(
    storage: StorageDep,
    principal: AdminDep,
    group_by: Annotated[str, Query(description=f"comma list of {list(GROUP_BY_FIELDS)}")] = "day,model",
    key_id: str | None = None,
    since: str | None = None,
    until: str | None = None,
) -> dict[str, Any]:
    """Request and token totals grouped by day (UTC), model, key and/or endpoint; newest day first."""
    groups = [g.strip() for g in group_by.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUP_BY_FIELDS]
    if unknown:
        raise bad_param("group_by", f"unknown field(s) {unknown}; valid: {list(GROUP_BY_FIELDS)}")
    rows = await storage.usage.summary(
        group_by=groups,
        key_id=parse_key_id(key_id) if key_id else None,
        since=parse_since(since, "since") if since else None,
        until=parse_since(until, "until") if until else None,
    )
    return {"object": "list", "group_by": groups, "data": [r.to_dict() for r in rows]}
