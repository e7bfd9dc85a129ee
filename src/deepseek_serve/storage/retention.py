"""Retention: delete usage records and conversations older than a cutoff, in small chunks.

Chunks (select ids, delete by id) keep each transaction short, so a purge on a busy MySQL never
holds long locks, and the same statements run on every backend.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select

from deepseek_serve.storage.db import SessionFactory
from deepseek_serve.storage.models import Conversation, Message, UsageRecord, utcnow

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    """`90d`, `12h`, `30m`, `45s`, `2w` -> timedelta; raises ValueError with the accepted forms."""
    match = _DURATION.match(text.lower())
    if not match:
        raise ValueError(f"invalid duration {text!r}: use a number and a unit s, m, h, d or w (e.g. 90d)")
    value = int(match.group(1))
    if value <= 0:
        raise ValueError(f"invalid duration {text!r}: must be positive")
    return timedelta(**{_UNITS[match.group(2)]: value})


@dataclass(frozen=True)
class PurgeResult:
    cutoff: datetime
    usage_records: int
    conversations: int
    messages: int


async def purge(sessions: SessionFactory, older_than: timedelta, *, chunk_size: int = 2000,
                now: datetime | None = None) -> PurgeResult:
    """Delete usage records created, and conversations last updated, before now - `older_than`."""
    cutoff = (now or utcnow()) - older_than
    usage = 0
    while True:
        async with sessions() as session, session.begin():
            ids = list((await session.execute(
                select(UsageRecord.id).where(UsageRecord.created_at < cutoff).limit(chunk_size))).scalars())
            if not ids:
                break
            await session.execute(delete(UsageRecord).where(UsageRecord.id.in_(ids)))
            usage += len(ids)
    conversations = messages = 0
    conv_chunk = max(chunk_size // 20, 1)
    while True:
        async with sessions() as session, session.begin():
            conv_ids = list((await session.execute(
                select(Conversation.id).where(Conversation.updated_at < cutoff).limit(conv_chunk))).scalars())
            if not conv_ids:
                break
            result = await session.execute(delete(Message).where(Message.conversation_id.in_(conv_ids)))
            messages += int(getattr(result, "rowcount", 0) or 0)
            await session.execute(delete(Conversation).where(Conversation.id.in_(conv_ids)))
            conversations += len(conv_ids)
    return PurgeResult(cutoff=cutoff, usage_records=usage, conversations=conversations, messages=messages)
