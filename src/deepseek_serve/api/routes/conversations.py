"""Server-side conversations: POST/GET /v1/conversations, GET .../{id}/messages, DELETE .../{id}.

A key sees only its own conversations; another key's conversation answers 404, exactly like a
missing one. Creating and deleting one count against the key's rate limits like a completion does
(one request; a seeded conversation also its text as tokens, estimated at 4 bytes a token since
nothing is tokenized). `StoredConversations` is the `ConversationStore` the chat route uses for
`conversation_id`: it reads the history to prepend and appends each finished turn.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from deepseek_serve.api.deps import InferenceDep, ServicesDep
from deepseek_serve.contracts import Principal
from deepseek_serve.serving.failures import ApiError, NotFoundError, RateLimitError
from deepseek_serve.serving.schemas import ChatMessage, Text
from deepseek_serve.serving.services import Services
from deepseek_serve.storage.conversations import ConversationNotFound, ConversationRepository
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

    def __init__(self, repo: ConversationRepository) -> None:
        self.repo = repo

    async def history(self, principal: Principal, conversation_id: str) -> list[dict[str, Any]]:
        """The stored messages as chat-completion input; 404 (NotFoundError) if not the caller's."""
        try:
            messages = await self.repo.messages(owner_of(principal), conversation_id)
        except ConversationNotFound:
            raise not_found(conversation_id) from None
        return [m.to_openai() for m in messages]

    async def append_turn(
        self,
        principal: Principal,
        conversation_id: str,
        user_messages: list[dict[str, Any]],
        answer: dict[str, Any],
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        """Append this turn's new messages and the answer (with its token counts)."""
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


class CreateConversationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: Text | None = Field(None, max_length=255)
    messages: list[ChatMessage] = Field(
        default_factory=list, max_length=1000, description="seed messages, e.g. a system prompt"
    )


@router.post("/conversations")
async def create_conversation(
    body: CreateConversationRequest,
    storage: StorageDep,
    services: ServicesDep,
    principal: InferenceDep,
    response: Response,
) -> dict[str, Any]:
    """A new conversation owned by the caller, optionally seeded with messages."""
    seed = [{"role": m.role, "content": m.text()} for m in body.messages]
    await count_write(services, principal, response, sum(len(m["content"].encode()) for m in seed) // 4 + len(seed))
    conv = await storage.conversations.create(owner_of(principal), body.title, seed)
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
