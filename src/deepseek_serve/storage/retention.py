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

_DURATION = re.compile(r"^\s*([0-9]{1,12})\s*([smhdw])\s*$", re.ASCII)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
MAX_DURATION = timedelta(days=100 * 366)
# what the DATETIME columns of every backend hold (MySQL/MariaDB: years 1000-9999)
MIN_DATETIME = datetime(1000, 1, 1)
MAX_DATETIME = datetime(9999, 12, 31)


def parse_duration(text: str) -> timedelta:
    """`90d`, `12h`, `30m`, `45s`, `2w` -> timedelta of at most 100 years; raises ValueError with the
    accepted forms."""
    match = _DURATION.match(text.lower())
    if not match:
        raise ValueError(f"invalid duration {text[:40]!r}: use a number and a unit s, m, h, d or w (e.g. 90d)")
    value = int(match.group(1))
    if value <= 0:
        raise ValueError(f"invalid duration {text!r}: must be positive")
    if value * _UNIT_SECONDS[match.group(2)] > MAX_DURATION.total_seconds():
        raise ValueError(f"invalid duration {text!r}: at most 100 years (36600d)")
    return timedelta(**{_UNITS[match.group(2)]: value})


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """A point in time as naive UTC: a duration back from now (`7d`, `12h`) or an ISO date/datetime
    (with an offset, converted to UTC), within what the database's DATETIME columns hold. Raises
    ValueError."""
    try:
        return (now or utcnow()) - parse_duration(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"invalid time {text[:40]!r}: use a duration like 7d or an ISO date such as 2026-01-31"
        ) from None
    if not MIN_DATETIME <= parsed.replace(tzinfo=None) <= MAX_DATETIME:
        raise ValueError(
            f"invalid time {text[:40]!r}: dates from {MIN_DATETIME.date()} to {MAX_DATETIME.date()} are supported"
        )
    if parsed.tzinfo is not None:
        parsed = (parsed - (parsed.utcoffset() or timedelta())).replace(tzinfo=None)
    return parsed


@dataclass(frozen=True)
class PurgeResult:
    cutoff: datetime
    usage_records: int
    conversations: int
    messages: int


async def purge(
    sessions: SessionFactory, older_than: timedelta, *, chunk_size: int = 2000, now: datetime | None = None
) -> PurgeResult:
    """Delete usage records created, and conversations last updated, before now - `older_than`."""
    cutoff = (now or utcnow()) - older_than
    usage = 0
    while True:
        async with sessions() as session, session.begin():
            ids = list(
                (
                    await session.execute(
                        select(UsageRecord.id).where(UsageRecord.created_at < cutoff).limit(chunk_size)
                    )
                ).scalars()
            )
            if not ids:
                break
            await session.execute(delete(UsageRecord).where(UsageRecord.id.in_(ids)))
            usage += len(ids)
    conversations = messages = 0
    conv_chunk = max(chunk_size // 20, 1)
    while True:
        async with sessions() as session, session.begin():
            conv_ids = list(
                (
                    await session.execute(
                        select(Conversation.id).where(Conversation.updated_at < cutoff).limit(conv_chunk)
                    )
                ).scalars()
            )
            if not conv_ids:
                break
            result = await session.execute(delete(Message).where(Message.conversation_id.in_(conv_ids)))
            messages += int(getattr(result, "rowcount", 0) or 0)
            await session.execute(delete(Conversation).where(Conversation.id.in_(conv_ids)))
            conversations += len(conv_ids)
    return PurgeResult(cutoff=cutoff, usage_records=usage, conversations=conversations, messages=messages)
