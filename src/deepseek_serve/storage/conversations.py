"""Server-side conversations: a key's own chat histories.

Every method takes the owner (`key_id`, None for the anonymous caller when auth is off) and only
ever touches that owner's rows: a conversation of another owner behaves exactly like a missing one.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from deepseek_serve.storage.db import SessionFactory
from deepseek_serve.storage.models import Conversation, Message, utcnow

CONVERSATION_ID_PREFIX = "conv_"
TITLE_CHARS = 80
ROLES = ("system", "user", "assistant", "tool", "developer")
FUNCTION_CALL, FUNCTION_CALL_OUTPUT = "function_call", "function_call_output"


class ItemNotFound(LookupError):
    """No such item in this (owned) conversation."""


class ConversationNotFound(LookupError):
    """No such conversation for this owner (it may exist for another)."""

    def __init__(self, conversation_id: str) -> None:
        super().__init__(f"No conversation found with id '{conversation_id}'.")
        self.conversation_id = conversation_id


def new_conversation_id() -> str:
    return CONVERSATION_ID_PREFIX + secrets.token_hex(12)


def _epoch(value: datetime) -> int:
    return int(value.timestamp()) if value.tzinfo else int((value - datetime(1970, 1, 1)).total_seconds())


def content_text(content: Any) -> str:
    """Message content as text: a string as is; OpenAI content parts joined by their text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return json.dumps(content, ensure_ascii=False)


@dataclass(frozen=True)
class ConversationInfo:
    id: str
    key_id: int | None
    title: str | None
    created_at: datetime
    updated_at: datetime
    num_messages: int = 0
    metadata: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's conversation object (`id`, `object`, `created_at`, `metadata`) with our fields
        (`title`, `updated_at`, `message_count`) as extensions."""
        return {
            "id": self.id,
            "object": "conversation",
            "created_at": _epoch(self.created_at),
            "metadata": dict(self.metadata or {}),
            "title": self.title,
            "updated_at": _epoch(self.updated_at),
            "message_count": self.num_messages,
        }


ITEM_PREFIXES = {None: "msg_", FUNCTION_CALL: "fc_", FUNCTION_CALL_OUTPUT: "fco_"}


def parse_item_id(item_id: str) -> tuple[str | None, int] | None:
    """(item type, row id) of an item id such as "msg_12" / "fc_13" / "fco_14"; None if malformed."""
    for item_type, prefix in ITEM_PREFIXES.items():
        digits = item_id[len(prefix) :]
        if item_id.startswith(prefix) and digits.isdigit() and len(digits) <= 18:
            return item_type, int(digits)
    return None


@dataclass(frozen=True)
class MessageInfo:
    """One stored item: a message, a function call or a function call's output (see models.Message)."""

    id: int
    role: str
    content: str
    reasoning_content: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    created_at: datetime
    item_type: str | None = None
    call_id: str | None = None
    name: str | None = None

    @property
    def item_id(self) -> str:
        return ITEM_PREFIXES.get(self.item_type, "msg_") + str(self.id)

    def to_dict(self) -> dict[str, Any]:
        """The item as GET .../messages lists it (our shape: chat roles, plain text content)."""
        out: dict[str, Any] = {
            "id": self.item_id,
            "object": "conversation.message",
            "role": self.role,
            "content": self.content,
            "created_at": _epoch(self.created_at),
        }
        if self.item_type == FUNCTION_CALL:
            out["content"] = None
            out["tool_calls"] = [self.tool_call()]
        elif self.item_type == FUNCTION_CALL_OUTPUT:
            out["tool_call_id"] = self.call_id
        if self.reasoning_content is not None:
            out["reasoning_content"] = self.reasoning_content
        if self.prompt_tokens is not None or self.completion_tokens is not None:
            out["usage"] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}
        return out

    def tool_call(self) -> dict[str, Any]:
        """A function-call item as a chat-completion tool call."""
        return {"id": self.call_id, "type": "function", "function": {"name": self.name, "arguments": self.content}}

    def to_item(self) -> dict[str, Any]:
        """The item in OpenAI's Conversations API shape (conversations/conversation_item.py)."""
        if self.item_type == FUNCTION_CALL:
            return {
                "id": self.item_id,
                "type": FUNCTION_CALL,
                "call_id": self.call_id,
                "name": self.name,
                "arguments": self.content,
                "status": "completed",
            }
        if self.item_type == FUNCTION_CALL_OUTPUT:
            return {
                "id": self.item_id,
                "type": FUNCTION_CALL_OUTPUT,
                "call_id": self.call_id,
                "output": self.content,
                "status": "completed",
            }
        part = (
            {"type": "output_text", "text": self.content, "annotations": []}
            if self.role == "assistant"
            else {"type": "input_text", "text": self.content}
        )
        return {
            "id": self.item_id,
            "type": "message",
            "role": self.role,
            "content": [part],
            "status": "completed",
        }


def chat_history(items: Sequence[MessageInfo]) -> list[dict[str, Any]]:
    """Stored items as chat-completion messages: function calls join the assistant message they follow
    (or open one) as `tool_calls`, outputs become `tool` messages with their `tool_call_id`. Reasoning
    is not fed back, as DeepSeek's API asks."""
    out: list[dict[str, Any]] = []
    for item in items:
        if item.item_type == FUNCTION_CALL:
            last = out[-1] if out else None
            if last is None or last["role"] != "assistant":
                last = {"role": "assistant", "content": None}
                out.append(last)
            last.setdefault("tool_calls", []).append(item.tool_call())
        elif item.item_type == FUNCTION_CALL_OUTPUT:
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.content})
        else:
            out.append({"role": item.role, "content": item.content})
    return out


def _owned(owner: int | None) -> ColumnElement[bool]:
    return Conversation.key_id.is_(None) if owner is None else Conversation.key_id == owner


class ConversationRepository:
    def __init__(self, sessions: SessionFactory) -> None:
        self._sessions = sessions

    async def create(
        self,
        owner: int | None,
        title: str | None = None,
        messages: Sequence[dict[str, Any]] = (),
        metadata: dict[str, str] | None = None,
    ) -> ConversationInfo:
        """A new conversation, optionally seeded with messages or items (e.g. a system prompt)."""
        now = utcnow()
        conv = Conversation(
            id=new_conversation_id(),
            key_id=owner,
            title=(title or None) and title[:255],
            meta=_metadata_json(metadata),
            created_at=now,
            updated_at=now,
        )
        rows = [row for m in messages for row in _message_rows(conv.id, m, now)]
        async with self._sessions() as session, session.begin():
            session.add(conv)
            await session.flush()
            session.add_all(rows)
        return ConversationInfo(conv.id, owner, conv.title, now, now, len(rows), metadata or None)

    async def get(self, owner: int | None, conversation_id: str) -> ConversationInfo:
        async with self._sessions() as session:
            conv = await _find(session, owner, conversation_id)
            if conv is None:
                raise ConversationNotFound(conversation_id)
            return await _info(session, conv)

    async def update(self, owner: int | None, conversation_id: str, values: dict[str, Any]) -> ConversationInfo:
        """Set `metadata` (a dict, or None to clear it) and/or `title`, the keys present in `values`."""
        changes: dict[str, Any] = {"updated_at": utcnow()}
        if "metadata" in values:
            changes["meta"] = _metadata_json(values["metadata"])
        if "title" in values:
            title = values["title"]
            changes["title"] = (title or None) and title[:255]
        async with self._sessions() as session, session.begin():
            conv = await _find(session, owner, conversation_id)
            if conv is None:
                raise ConversationNotFound(conversation_id)
            for key, value in changes.items():
                setattr(conv, key, value)
            await session.flush()
            return await _info(session, conv)

    async def list_for(
        self, owner: int | None, *, limit: int = 20, before: datetime | None = None
    ) -> list[ConversationInfo]:
        """The owner's conversations, most recently updated first."""
        counts = select(Message.conversation_id, func.count().label("n")).group_by(Message.conversation_id).subquery()
        stmt = (
            select(Conversation, func.coalesce(counts.c.n, 0))
            .outerjoin(counts, counts.c.conversation_id == Conversation.id)
            .where(_owned(owner))
            .order_by(Conversation.updated_at.desc(), Conversation.id.desc())
            .limit(limit)
        )
        if before is not None:
            stmt = stmt.where(Conversation.updated_at < before)
        async with self._sessions() as session:
            return [_conversation_info(c, int(n)) for c, n in (await session.execute(stmt)).all()]

    async def messages(self, owner: int | None, conversation_id: str, *, limit: int | None = None) -> list[MessageInfo]:
        """Items in order; raises ConversationNotFound for a conversation the owner lacks."""
        async with self._sessions() as session:
            await _require(session, owner, conversation_id)
            stmt = select(Message).where(Message.conversation_id == conversation_id).order_by(Message.id)
            if limit is not None:
                stmt = stmt.limit(limit)
            return [_message_info(m) for m in (await session.execute(stmt)).scalars()]

    async def items(
        self,
        owner: int | None,
        conversation_id: str,
        *,
        limit: int = 20,
        order: str = "desc",
        after: int | None = None,
    ) -> tuple[list[MessageInfo], bool]:
        """A page of items in `order` ("asc" / "desc" by position), after the item of row id `after`;
        and whether more follow."""
        descending = order == "desc"
        async with self._sessions() as session:
            await _require(session, owner, conversation_id)
            stmt = (
                select(Message)
                .where(Message.conversation_id == conversation_id)
                .order_by(Message.id.desc() if descending else Message.id)
                .limit(limit + 1)
            )
            if after is not None:
                stmt = stmt.where(Message.id < after if descending else Message.id > after)
            rows = [_message_info(m) for m in (await session.execute(stmt)).scalars()]
        return rows[:limit], len(rows) > limit

    async def item(self, owner: int | None, conversation_id: str, item_type: str | None, row_id: int) -> MessageInfo:
        """One item; ConversationNotFound / ItemNotFound."""
        async with self._sessions() as session:
            await _require(session, owner, conversation_id)
            row = await _find_item(session, conversation_id, item_type, row_id)
            return _message_info(row)

    async def delete_item(
        self, owner: int | None, conversation_id: str, item_type: str | None, row_id: int
    ) -> ConversationInfo:
        """Delete one item; the conversation as it is afterwards. ConversationNotFound / ItemNotFound."""
        async with self._sessions() as session, session.begin():
            conv = await _find(session, owner, conversation_id)
            if conv is None:
                raise ConversationNotFound(conversation_id)
            row = await _find_item(session, conversation_id, item_type, row_id)
            await session.delete(row)
            conv.updated_at = utcnow()
            await session.flush()
            return await _info(session, conv)

    async def append(
        self, owner: int | None, conversation_id: str, messages: Sequence[dict[str, Any]]
    ) -> list[MessageInfo]:
        """Add messages or items at the end (an assistant message with `tool_calls` becomes a message
        item and one function-call item per call); the stored items. Sets the title from the first
        user message if there is none."""
        now = utcnow()
        rows = [row for m in messages for row in _message_rows(conversation_id, m, now)]
        async with self._sessions() as session, session.begin():
            conv = await _find(session, owner, conversation_id)
            if conv is None:
                raise ConversationNotFound(conversation_id)
            session.add_all(rows)
            values: dict[str, Any] = {"updated_at": now}
            if conv.title is None:
                first_user = next((content_text(m.get("content")) for m in messages if m.get("role") == "user"), "")
                if first_user.strip():
                    values["title"] = " ".join(first_user.split())[:TITLE_CHARS]
            await session.flush()
            stored = [_message_info(r) for r in rows]
            await session.execute(update(Conversation).where(Conversation.id == conversation_id).values(**values))
        return stored

    async def delete(self, owner: int | None, conversation_id: str) -> None:
        """Delete a conversation and its messages; raises ConversationNotFound."""
        async with self._sessions() as session, session.begin():
            await _require(session, owner, conversation_id)
            await session.execute(delete(Message).where(Message.conversation_id == conversation_id))
            await session.execute(delete(Conversation).where(Conversation.id == conversation_id))


async def _find(session: AsyncSession, owner: int | None, conversation_id: str) -> Conversation | None:
    stmt = select(Conversation).where(Conversation.id == conversation_id, _owned(owner))
    return (await session.execute(stmt)).scalar_one_or_none()


async def _require(session: AsyncSession, owner: int | None, conversation_id: str) -> None:
    found = (
        await session.execute(select(Conversation.id).where(Conversation.id == conversation_id, _owned(owner)))
    ).first()
    if found is None:
        raise ConversationNotFound(conversation_id)


async def _find_item(session: AsyncSession, conversation_id: str, item_type: str | None, row_id: int) -> Message:
    row = (
        await session.execute(select(Message).where(Message.id == row_id, Message.conversation_id == conversation_id))
    ).scalar_one_or_none()
    if row is None or row.item_type != item_type:
        raise ItemNotFound(row_id)
    return row


async def _info(session: AsyncSession, conv: Conversation) -> ConversationInfo:
    count = (
        await session.execute(select(func.count()).select_from(Message).where(Message.conversation_id == conv.id))
    ).scalar_one()
    return _conversation_info(conv, int(count))


def _conversation_info(conv: Conversation, count: int) -> ConversationInfo:
    metadata = json.loads(conv.meta) if conv.meta else None
    return ConversationInfo(conv.id, conv.key_id, conv.title, conv.created_at, conv.updated_at, count, metadata)


def _metadata_json(metadata: dict[str, str] | None) -> str | None:
    return json.dumps(metadata, ensure_ascii=False) if metadata else None


def _message_info(m: Message) -> MessageInfo:
    return MessageInfo(
        m.id,
        m.role,
        m.content,
        m.reasoning_content,
        m.prompt_tokens,
        m.completion_tokens,
        m.created_at,
        m.item_type,
        m.call_id,
        m.name,
    )


def _message_rows(conversation_id: str, m: dict[str, Any], now: datetime) -> list[Message]:
    """The rows of one message or item dict: {"type": "function_call", "call_id", "name", "arguments"},
    {"type": "function_call_output", "call_id", "output"}, or a chat message (role, content, optional
    reasoning_content, token counts, `tool_calls` of an assistant, `tool_call_id` of a tool result)."""

    def row(role: str, content: str, **fields: Any) -> Message:
        return Message(conversation_id=conversation_id, role=role, content=content, created_at=now, **fields)

    kind = m.get("type")
    if kind == FUNCTION_CALL:
        return [row("assistant", str(m["arguments"]), item_type=FUNCTION_CALL, call_id=m["call_id"], name=m["name"])]
    if kind == FUNCTION_CALL_OUTPUT:
        return [row("tool", content_text(m.get("output")), item_type=FUNCTION_CALL_OUTPUT, call_id=m["call_id"])]
    role = str(m.get("role") or "user")
    if role not in ROLES:
        raise ValueError(f"invalid message role {role!r}; valid roles: {list(ROLES)}")
    content = content_text(m.get("content"))
    counts = {"prompt_tokens": m.get("prompt_tokens"), "completion_tokens": m.get("completion_tokens")}
    if role == "tool" and m.get("tool_call_id"):
        return [row("tool", content, item_type=FUNCTION_CALL_OUTPUT, call_id=str(m["tool_call_id"]), **counts)]
    reasoning = m.get("reasoning_content")
    calls = (m.get("tool_calls") or []) if role == "assistant" else []
    rows: list[Message] = []
    if content or reasoning is not None or not calls:
        rows.append(row(role, content, reasoning_content=str(reasoning) if reasoning is not None else None))
    for call in calls:
        function = call.get("function") or {}
        rows.append(
            row(
                "assistant",
                str(function.get("arguments") or "{}"),
                item_type=FUNCTION_CALL,
                call_id=str(call.get("id") or ""),
                name=str(function.get("name") or ""),
            )
        )
    # a turn's token counts go on its first row
    rows[0].prompt_tokens, rows[0].completion_tokens = counts["prompt_tokens"], counts["completion_tokens"]
    return rows
