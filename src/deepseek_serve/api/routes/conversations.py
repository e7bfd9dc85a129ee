"""Server-side conversations, in the shapes of OpenAI's Conversations API plus our extensions:

- POST /v1/conversations (`metadata`, `items`; ours: `title`, `messages`), GET / POST (update) /
  DELETE /v1/conversations/{id};
- items: POST / GET /v1/conversations/{id}/items, GET / DELETE .../items/{item_id};
- ours: GET /v1/conversations (the key's, newest first), GET .../{id}/messages (chat-shaped).

A key sees only its own conversations; another key's conversation answers 404, exactly like a
missing one. Every write (create, update, delete, adding or deleting items) counts against the key's rate
limits like a completion does (one request; added text also as tokens, estimated at 4 bytes a token
since nothing is tokenized). `StoredConversations` is the `ConversationStore` the chat route uses for
`conversation_id`: it reads the history to prepend and appends each finished turn.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Response

from deepseek_serve.api.conversation_items import (
    CreateConversationRequest,
    CreateItemsRequest,
    UpdateConversationRequest,
    estimated_tokens,
    stored_items,
    stored_messages,
)
from deepseek_serve.api.deps import InferenceDep, ServicesDep
from deepseek_serve.contracts import Principal
from deepseek_serve.serving.failures import ApiError, NotFoundError, RateLimitError
from deepseek_serve.serving.services import Services
from deepseek_serve.storage.conversations import (
    ConversationNotFound,
    ConversationRepository,
    ItemNotFound,
    MessageInfo,
    chat_history,
    parse_item_id,
)
from deepseek_serve.storage.runtime import Storage

router = APIRouter(prefix="/v1", tags=["conversations"])


def owner_of(principal: Principal) -> int | None:
    """The storage owner id of a principal (None: the anonymous caller when auth is off)."""
    return principal.key_id


def not_found(conversation_id: str) -> NotFoundError:
    return NotFoundError(
        f"No conversation found with id '{conversation_id}'.", param="conversation_id", code="conversation_not_found"
    )


class StoredConversations:
    """Implements contracts.ConversationStore over the conversation repository."""

    def __init__(self, repo: ConversationRepository, max_items: int) -> None:
        self.repo = repo
        self.max_items = max_items  # settings.max_messages: a longer history is a 400 in plan_chat anyway

    async def history(self, principal: Principal, conversation_id: str) -> list[dict[str, Any]]:
        """The stored messages as chat-completion input; 404 (NotFoundError) if not the caller's."""
        try:
            # one more than allowed, so the chat's check sees the history is too long
            items = await self.repo.messages(owner_of(principal), conversation_id, limit=self.max_items + 1)
        except ConversationNotFound:
            raise not_found(conversation_id) from None
        return chat_history(items)

    async def append_turn(
        self,
        principal: Principal,
        conversation_id: str,
        user_messages: list[dict[str, Any]],
        answer: dict[str, Any],
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        """Append this turn's new messages and the answer (with its token counts); tool calls and tool
        results stay structured (function-call and function-call-output items)."""
        stored_answer = {**answer, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        try:
            await self.repo.append(owner_of(principal), conversation_id, [*user_messages, stored_answer])
        except ConversationNotFound:
            raise not_found(conversation_id) from None


async def count_write(services: Services, principal: Principal, response: Response, tokens: int = 0) -> None:
    """Admit one conversation write through the rate limiter (429 when refused); the x-ratelimit-*
    headers go on `response`."""
    limiter = services.limiter
    if limiter is None:
        return
    decision = await limiter.admit(principal, tokens)
    if not decision.allowed:
        if services.metrics is not None:
            services.metrics.rejected("rate_limited")
        raise RateLimitError.refused(decision)
    response.headers.update(decision.headers())


def get_storage(services: ServicesDep) -> Storage:
    storage = services.extras.get("storage")
    if not isinstance(storage, Storage):
        raise ApiError(
            404, "Persistence is not enabled on this server.", "invalid_request_error", None, "persistence_disabled"
        )
    return storage


StorageDep = Annotated[Storage, Depends(get_storage)]


@router.post("/conversations")
async def create_conversation(
    body: CreateConversationRequest,
    storage: StorageDep,
    services: ServicesDep,
    principal: InferenceDep,
    response: Response,
) -> dict[str, Any]:
    """A new conversation owned by the caller, optionally with metadata and seeded with messages or items."""
    seed = stored_messages(body.messages or []) + stored_items(list(body.items or []))
    check_item_count(services, len(seed))
    await count_write(services, principal, response, estimated_tokens(seed))
    conv = await storage.conversations.create(owner_of(principal), body.title, seed, body.metadata)
    return conv.to_dict()


@router.get("/conversations")
async def list_conversations(
    storage: StorageDep, principal: InferenceDep, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> dict[str, Any]:
    """The caller's conversations, most recently updated first."""
    convs = await storage.conversations.list_for(owner_of(principal), limit=limit)
    return {"object": "list", "data": [c.to_dict() for c in convs], "has_more": len(convs) == limit}


@router.get("/conversations/{conversation_id}")
async def get_conversation(conversation_id: str, storage: StorageDep, principal: InferenceDep) -> dict[str, Any]:
    """One of the caller's conversations; 404 for any other id."""
    try:
        return (await storage.conversations.get(owner_of(principal), conversation_id)).to_dict()
    except ConversationNotFound:
        raise not_found(conversation_id) from None


@router.post("/conversations/{conversation_id}")
async def update_conversation(
    conversation_id: str,
    body: UpdateConversationRequest,
    storage: StorageDep,
    services: ServicesDep,
    principal: InferenceDep,
    response: Response,
) -> dict[str, Any]:
    """Replace the metadata (null clears it) and/or the title of one of the caller's conversations."""
    values = body.model_dump(include=body.model_fields_set)
    if not values:
        raise ApiError(
            400,
            "Missing required parameter: 'metadata'.",
            "invalid_request_error",
            "metadata",
            "missing_required_parameter",
        )
    await count_write(services, principal, response)
    try:
        return (await storage.conversations.update(owner_of(principal), conversation_id, values)).to_dict()
    except ConversationNotFound:
        raise not_found(conversation_id) from None


@router.get("/conversations/{conversation_id}/messages")
async def list_messages(conversation_id: str, storage: StorageDep, principal: InferenceDep) -> dict[str, Any]:
    """The messages of one of the caller's conversations, oldest first; 404 for any other id."""
    try:
        messages = await storage.conversations.messages(owner_of(principal), conversation_id)
    except ConversationNotFound:
        raise not_found(conversation_id) from None
    return {"object": "list", "data": [m.to_dict() for m in messages]}


@router.delete("/conversations/{conversation_id}")
async def delete_conversation(
    conversation_id: str, storage: StorageDep, services: ServicesDep, principal: InferenceDep, response: Response
) -> dict[str, Any]:
    """Delete one of the caller's conversations with its messages; 404 for any other id."""
    await count_write(services, principal, response)
    try:
        await storage.conversations.delete(owner_of(principal), conversation_id)
    except ConversationNotFound:
        raise not_found(conversation_id) from None
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


def check_item_count(services: Services, count: int) -> None:
    """A conversation holds at most settings.max_messages items: a chat turn could not use more."""
    limit = services.settings.max_messages
    if count > limit:
        raise ApiError(
            400,
            f"A conversation holds at most {limit} items; this would make {count}.",
            "invalid_request_error",
            "items",
            "invalid_value",
        )


# --- items ------------------------------------------------------------------------------------------------
def item_page(items: list[MessageInfo], has_more: bool) -> dict[str, Any]:
    data = [i.to_item() for i in items]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def item_not_found(item_id: str) -> NotFoundError:
    return NotFoundError(f"No item found with id '{item_id[:80]}'.", param="item_id", code="item_not_found")


def item_key(item_id: str) -> tuple[str | None, int]:
    """(item type, row id) of an item id; 404 for an id no item can have."""
    parsed = parse_item_id(item_id)
    if parsed is None:
        raise item_not_found(item_id)
    return parsed


def after_row(after: str | None) -> int | None:
    if after is None:
        return None
    parsed = parse_item_id(after)
    if parsed is None:
        raise ApiError(
            400, "Invalid value for 'after': not an item id.", "invalid_request_error", "after", "invalid_value"
        )
    return parsed[1]


Include = Annotated[list[str] | None, Query(max_length=16)]  # accepted; no includable data here


@router.post("/conversations/{conversation_id}/items")
async def create_items(
    conversation_id: str,
    body: CreateItemsRequest,
    storage: StorageDep,
    services: ServicesDep,
    principal: InferenceDep,
    response: Response,
    include: Include = None,
) -> dict[str, Any]:
    """Append up to 20 items to one of the caller's conversations; the stored items as a list."""
    entries = stored_items(list(body.items))
    try:
        conv = await storage.conversations.get(owner_of(principal), conversation_id)
    except ConversationNotFound:
        raise not_found(conversation_id) from None
    check_item_count(services, conv.num_messages + len(entries))
    await count_write(services, principal, response, estimated_tokens(entries))
    try:
        stored = await storage.conversations.append(owner_of(principal), conversation_id, entries)
    except ConversationNotFound:
        raise not_found(conversation_id) from None
    return item_page(stored, False)


@router.get("/conversations/{conversation_id}/items")
async def list_items(
    conversation_id: str,
    storage: StorageDep,
    principal: InferenceDep,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    include: Include = None,
) -> dict[str, Any]:
    """A page of the conversation's items (newest first unless `order=asc`), after the item `after`."""
    try:
        items, has_more = await storage.conversations.items(
            owner_of(principal), conversation_id, limit=limit, order=order, after=after_row(after)
        )
    except ConversationNotFound:
        raise not_found(conversation_id) from None
    return item_page(items, has_more)


@router.get("/conversations/{conversation_id}/items/{item_id}")
async def get_item(
    conversation_id: str, item_id: str, storage: StorageDep, principal: InferenceDep, include: Include = None
) -> dict[str, Any]:
    """One item of one of the caller's conversations."""
    item_type, row = item_key(item_id)
    try:
        return (await storage.conversations.item(owner_of(principal), conversation_id, item_type, row)).to_item()
    except ConversationNotFound:
        raise not_found(conversation_id) from None
    except ItemNotFound:
        raise item_not_found(item_id) from None


@router.delete("/conversations/{conversation_id}/items/{item_id}")
async def delete_item(
    conversation_id: str,
    item_id: str,
    storage: StorageDep,
    services: ServicesDep,
    principal: InferenceDep,
    response: Response,
) -> dict[str, Any]:
    """Delete one item; the conversation as it is afterwards (as OpenAI answers)."""
    item_type, row = item_key(item_id)
    await count_write(services, principal, response)
    try:
        conv = await storage.conversations.delete_item(owner_of(principal), conversation_id, item_type, row)
    except ConversationNotFound:
        raise not_found(conversation_id) from None
    except ItemNotFound:
        raise item_not_found(item_id) from None
    return conv.to_dict()
