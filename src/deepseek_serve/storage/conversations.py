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

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "conversation",
            "title": self.title,
            "created_at": _epoch(self.created_at),
            "updated_at": _epoch(self.updated_at),
            "message_count": self.num_messages,
        }


@dataclass(frozen=True)
class MessageInfo:
    id: int
    role: str
    content: str
    reasoning_content: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": f"msg_{self.id}",
            "object": "conversation.message",
            "role": self.role,
            "content": self.content,
            "created_at": _epoch(self.created_at),
        }
        if self.reasoning_content is not None:
            out["reasoning_content"] = self.reasoning_content
        if self.prompt_tokens is not None or self.completion_tokens is not None:
            out["usage"] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}
        return out

    def to_openai(self) -> dict[str, Any]:
        """The message as a chat-completion input (reasoning is not fed back, as DeepSeek's API asks)."""
        return {"role": self.role, "content": self.content}


def _owned(owner: int | None) -> ColumnElement[bool]:
    return Conversation.key_id.is_(None) if owner is None else Conversation.key_id == owner


class ConversationRepository:
    def __init__(self, sessions: SessionFactory) -> None:
        self._sessions = sessions

    async def create(
        self, owner: int | None, title: str | None = None, messages: Sequence[dict[str, Any]] = ()
    ) -> ConversationInfo:
        """A new conversation, optionally seeded with messages (e.g. a system prompt)."""
        now = utcnow()
        conv = Conversation(
            id=new_conversation_id(),
            key_id=owner,
            title=(title or None) and title[:255],
            created_at=now,
            updated_at=now,
        )
        async with self._sessions() as session, session.begin():
            session.add(conv)
            await session.flush()
            for m in messages:
                session.add(_message_row(conv.id, m, now))
        return ConversationInfo(conv.id, owner, conv.title, now, now, len(messages))

    async def get(self, owner: int | None, conversation_id: str) -> ConversationInfo:
        async with self._sessions() as session:
            conv = await _find(session, owner, conversation_id)
            if conv is None:
                raise ConversationNotFound(conversation_id)
            count = (
                await session.execute(
                    select(func.count()).select_from(Message).where(Message.conversation_id == conv.id)
                )
            ).scalar_one()
            return ConversationInfo(conv.id, conv.key_id, conv.title, conv.created_at, conv.updated_at, int(count))

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
            return [
                ConversationInfo(c.id, c.key_id, c.title, c.created_at, c.updated_at, int(n))
                for c, n in (await session.execute(stmt)).all()
            ]

    async def messages(self, owner: int | None, conversation_id: str, *, limit: int | None = None) -> list[MessageInfo]:
        """Messages in order; raises ConversationNotFound for a conversation the owner lacks."""
        async with self._sessions() as session:
            exists = (
                await session.execute(select(Conversation.id).where(Conversation.id == conversation_id, _owned(owner)))
            ).first()
            if exists is None:
                raise ConversationNotFound(conversation_id)
            stmt = select(Message).where(Message.conversation_id == conversation_id).order_by(Message.id)
            if limit is not None:
                stmt = stmt.limit(limit)
            return [
                MessageInfo(
                    m.id, m.role, m.content, m.reasoning_content, m.prompt_tokens, m.completion_tokens, m.created_at
                )
                for m in (await session.execute(stmt)).scalars()
            ]

    async def append(self, owner: int | None, conversation_id: str, messages: Sequence[dict[str, Any]]) -> None:
        """Add messages at the end; sets the title from the first user message if there is none."""
        now = utcnow()
        async with self._sessions() as session, session.begin():
            conv = await _find(session, owner, conversation_id)
            if conv is None:
                raise ConversationNotFound(conversation_id)
            for m in messages:
                session.add(_message_row(conversation_id, m, now))
            values: dict[str, Any] = {"updated_at": now}
            if conv.title is None:
                first_user = next((content_text(m.get("content")) for m in messages if m.get("role") == "user"), "")
                if first_user.strip():
                    values["title"] = " ".join(first_user.split())[:TITLE_CHARS]
            await session.execute(update(Conversation).where(Conversation.id == conversation_id).values(**values))

    async def delete(self, owner: int | None, conversation_id: str) -> None:
        """Delete a conversation and its messages; raises ConversationNotFound."""
        async with self._sessions() as session, session.begin():
            found = (
                await session.execute(select(Conversation.id).where(Conversation.id == conversation_id, _owned(owner)))
            ).first()
            if found is None:
                raise ConversationNotFound(conversation_id)
            await session.execute(delete(Message).where(Message.conversation_id == conversation_id))
            await session.execute(delete(Conversation).where(Conversation.id == conversation_id))


async def _find(session: AsyncSession, owner: int | None, conversation_id: str) -> Conversation | None:
    stmt = select(Conversation).where(Conversation.id == conversation_id, _owned(owner))
    return (await session.execute(stmt)).scalar_one_or_none()


def _message_row(conversation_id: str, m: dict[str, Any], now: datetime) -> Message:
    role = str(m.get("role") or "user")
    if role not in ROLES:
        raise ValueError(f"invalid message role {role!r}; valid roles: {list(ROLES)}")
    reasoning = m.get("reasoning_content")
    return Message(
        conversation_id=conversation_id,
        role=role,
        content=content_text(m.get("content")),
        reasoning_content=str(reasoning) if reasoning is not None else None,
        prompt_tokens=m.get("prompt_tokens"),
        completion_tokens=m.get("completion_tokens"),
        created_at=now,
    )
