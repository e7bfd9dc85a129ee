"""The OpenAPI document (`/openapi.json`) as the server really answers.

FastAPI derives a schema from the routes, with two gaps this module fills after generation:

- errors: FastAPI documents a 422 `HTTPValidationError` that this server never sends; every refusal is
  an OpenAI error body (`serving/failures.py`) with its own status. Each operation lists the statuses it can
  answer with (`ErrorResponse`), and the 422 is dropped;
- routes that return plain dicts (conversations, admin) get their response schemas, and the links a
  client (or a stateful fuzzer) can follow: a created conversation's or key's `id` into the routes
  that take it.

Bearer auth is declared as a security scheme, required by every route except the health checks.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ConversationObject(BaseModel):
    id: str
    object: Literal["conversation"]
    created_at: int
    metadata: dict[str, str]
    title: str | None
    updated_at: int
    message_count: int


class ConversationList(BaseModel):
    object: Literal["list"]
    data: list[ConversationObject]
    has_more: bool


class MessageUsage(BaseModel):
    prompt_tokens: int | None
    completion_tokens: int | None


class ConversationMessage(BaseModel):
    id: str
    object: Literal["conversation.message"]
    role: str
    content: str | None
    created_at: int
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    usage: MessageUsage | None = None


class ConversationMessageList(BaseModel):
    object: Literal["list"]
    data: list[ConversationMessage]


class ItemTextPart(BaseModel):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None


class ConversationItem(BaseModel):
    """A `message`, `function_call` or `function_call_output` item (OpenAI's Conversations API)."""

    id: str
    type: Literal["message", "function_call", "function_call_output"]
    status: Literal["completed"]
    role: str | None = None
    content: list[ItemTextPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None


class ConversationItemList(BaseModel):
    object: Literal["list"]
    data: list[ConversationItem]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ConversationDeleted(BaseModel):
    id: str
    object: Literal["conversation.deleted"]
    deleted: bool


class ApiKeyObject(BaseModel):
    id: str
    object: Literal["api_key"]
    name: str
    prefix: str
    scopes: list[str]
    rpm_limit: int | None
    tpm_limit: int | None
    created_at: str | None
    expires_at: str | None
    revoked_at: str | None
    last_used_at: str | None


class CreatedApiKey(ApiKeyObject):
    key: str


class RevokedApiKey(ApiKeyObject):
    revoked: bool


class ApiKeyList(BaseModel):
    object: Literal["list"]
    data: list[ApiKeyObject]


class UsageRow(BaseModel):
    """Group fields not asked for in `group_by` are null."""

    day: str | None
    model: str | None
    key_id: str | None
    endpoint: str | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    errors: int
    total_tokens: int


class UsageSummary(BaseModel):
    object: Literal["list"]
    group_by: list[str]
    data: list[UsageRow]


class HealthStatus(BaseModel):
    model_config = {"extra": "allow"}  # engine stats

    status: str


_MODELS: tuple[type[BaseModel], ...] = (
    ErrorResponse,
    ConversationObject,
    ConversationList,
    ConversationMessageList,
    ConversationItem,
    ConversationItemList,
    ConversationDeleted,
    CreatedApiKey,
    RevokedApiKey,
    ApiKeyList,
    UsageSummary,
    HealthStatus,
)

# (method, path) -> (success status, response model)
_RESPONSES: dict[tuple[str, str], tuple[str, type[BaseModel]]] = {
    ("post", "/v1/conversations"): ("200", ConversationObject),
    ("get", "/v1/conversations"): ("200", ConversationList),
    ("get", "/v1/conversations/{conversation_id}"): ("200", ConversationObject),
    ("get", "/v1/conversations/{conversation_id}/messages"): ("200", ConversationMessageList),
    ("delete", "/v1/conversations/{conversation_id}"): ("200", ConversationDeleted),
    ("post", "/v1/conversations/{conversation_id}"): ("200", ConversationObject),
    ("post", "/v1/conversations/{conversation_id}/items"): ("200", ConversationItemList),
    ("get", "/v1/conversations/{conversation_id}/items"): ("200", ConversationItemList),
    ("get", "/v1/conversations/{conversation_id}/items/{item_id}"): ("200", ConversationItem),
    ("delete", "/v1/conversations/{conversation_id}/items/{item_id}"): ("200", ConversationObject),
    ("post", "/admin/keys"): ("201", CreatedApiKey),
    ("get", "/admin/keys"): ("200", ApiKeyList),
    ("delete", "/admin/keys/{key_id}"): ("200", RevokedApiKey),
    ("get", "/admin/usage"): ("200", UsageSummary),
    ("get", "/health"): ("200", HealthStatus),
    ("get", "/health/ready"): ("200", HealthStatus),
    ("get", "/health/live"): ("200", HealthStatus),
}

_LINKS: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/v1/conversations"): {
        name: {
            "operationRef": f"#/paths/~1v1~1conversations~1{{conversation_id}}{suffix}/{method}",
            "parameters": {"conversation_id": "$response.body#/id"},
        }
        for name, suffix, method in (
            ("GetConversation", "", "get"),
            ("UpdateConversation", "", "post"),
            ("ListConversationMessages", "~1messages", "get"),
            ("ListConversationItems", "~1items", "get"),
            ("CreateConversationItems", "~1items", "post"),
            ("DeleteConversation", "", "delete"),
        )
    },
    ("post", "/admin/keys"): {
        "RevokeKey": {
            "operationRef": "#/paths/~1admin~1keys~1{key_id}/delete",
            "parameters": {"key_id": "$response.body#/id"},
        },
    },
}

_ERROR_TEXT = {
    "400": "Invalid request: the error's `param` names the offending parameter",
    "401": "Missing, unknown, expired or revoked API key",
    "403": "The API key lacks the scope this route needs",
    "404": "No such resource (for the caller's key)",
    "413": "Request body too large",
    "429": "Rate limit, concurrency cap or full queue (`Retry-After` says when to retry)",
    "503": "A backing service (database, engine) is unavailable (`Retry-After` says when to retry)",
    "504": "The request timed out in the engine",
}

_PUBLIC = ("/health", "/health/ready", "/health/live")


def _error_statuses(method: str, path: str) -> list[str]:
    if path in _PUBLIC:
        return ["503"] if path != "/health/live" else []
    statuses = ["400", "401", "403", "404", "429", "503"]
    if method in ("post", "put", "patch"):
        statuses.append("413")
    if path in ("/v1/chat/completions", "/v1/completions"):
        statuses.append("504")
    return sorted(statuses)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def build_openapi(app: FastAPI, served_model: str | None = None) -> dict[str, Any]:
    """The app's OpenAPI document with the documented errors, response schemas, links and auth;
    with `served_model`, the generation requests' `model` is documented as that one id."""
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    if served_model is not None:
        for request in ("ChatCompletionRequest", "CompletionRequest"):
            model = schemas.get(request, {}).get("properties", {}).get("model")
            if model is not None:
                model.update({"enum": [served_model], "description": "the served model's id (GET /v1/models)"})
    for model in _MODELS:
        definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(definition.pop("$defs", {}))
        schemas[model.__name__] = definition
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    components.setdefault("securitySchemes", {})["bearerAuth"] = {"type": "http", "scheme": "bearer"}
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            success = _RESPONSES.get((method, path))
            if success is not None:
                status, model = success
                ok = responses.pop("200", None) or {}
                responses[status] = {
                    "description": ok.get("description") or "Successful Response",
                    "content": {"application/json": {"schema": _ref(model)}},
                }
                if path in ("/health", "/health/ready"):
                    responses["503"] = {
                        "description": "Not ready: the body says why",
                        "content": {"application/json": {"schema": _ref(HealthStatus)}},
                    }
            links = _LINKS.get((method, path))
            if links is not None:
                responses[success[0] if success else "200"]["links"] = links
            for status in _error_statuses(method, path):
                responses.setdefault(
                    status,
                    {
                        "description": _ERROR_TEXT[status],
                        "content": {"application/json": {"schema": _ref(ErrorResponse)}},
                    },
                )
            if path not in _PUBLIC:
                operation["security"] = [{"bearerAuth": []}]
    return schema


def install_openapi(app: FastAPI) -> None:
    """Serve `build_openapi(app)` at the app's openapi_url: built on the first request after the
    lifespan started the engine (so it names the served model), once."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        services = getattr(app.state, "services", None)
        if services is None:
            return build_openapi(app)
        app.openapi_schema = build_openapi(app, services.engine.model_info.id)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
