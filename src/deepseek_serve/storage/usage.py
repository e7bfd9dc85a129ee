"""Usage accounting: the repository (idempotent batch insert, summaries).

The writer that feeds it from the request path is storage/writer.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import Select, case, func, insert, select
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from deepseek_serve.storage.db import SessionFactory
from deepseek_serve.storage.models import UsageRecord

if TYPE_CHECKING:
    from deepseek_serve.contracts import UsageEvent

GROUP_BY_FIELDS = ("day", "model", "key", "endpoint")


def _to_naive_utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc).replace(tzinfo=None)


def event_to_row(event: UsageEvent | dict[str, Any], store_content: bool) -> dict[str, Any]:
    """Column values for one usage event (an event object or its spooled dict)."""
    data = dataclasses.asdict(event) if not isinstance(event, dict) else event
    key_id = data.get("key_id")
    return {
        "request_id": str(data["request_id"])[:64],
        "key_id": int(key_id) if key_id not in (None, "") else None,
        "model": str(data.get("model") or "")[:128],
        "endpoint": str(data.get("endpoint") or "")[:32],
        "status": int(data.get("status") or 0),
        "finish_reason": (data.get("finish_reason") or None) and str(data["finish_reason"])[:16],
        "prompt_tokens": int(data.get("prompt_tokens") or 0),
        "completion_tokens": int(data.get("completion_tokens") or 0),
        "cached_tokens": int(data.get("cached_tokens") or 0),
        "reasoning_tokens": int(data.get("reasoning_tokens") or 0),
        "queue_ms": data.get("queue_ms"),
        "first_token_ms": data.get("first_token_ms"),
        "total_ms": data.get("total_ms"),
        "prompt_text": data.get("prompt_text") if store_content else None,
        "completion_text": data.get("completion_text") if store_content else None,
        "created_at": _to_naive_utc(float(data.get("created_at") or 0.0) or _now_ts()),
    }


def _now_ts() -> float:
    return datetime.now(timezone.utc).timestamp()


@dataclass(frozen=True)
class UsageRow:
    """One line of a usage summary; group fields not asked for are None."""

    day: str | None
    model: str | None
    key_id: int | None
    endpoint: str | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    errors: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["key_id"] = str(self.key_id) if self.key_id is not None else None
        out["total_tokens"] = self.total_tokens
        return out


class UsageRepository:
    def __init__(self, engine: AsyncEngine, sessions: SessionFactory) -> None:
        self._engine = engine
        self._sessions = sessions

    async def insert_many(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert rows, skipping request ids already stored (idempotent)."""
        if not rows:
            return
        dialect = self._engine.dialect.name
        if dialect in {"mysql", "mariadb"}:
            ins = mysql_insert(UsageRecord)
            # no-op update on a duplicate request_id (unlike INSERT IGNORE, other errors still raise)
            stmt: Any = ins.on_duplicate_key_update(request_id=ins.inserted.request_id)
        elif dialect == "sqlite":
            stmt = sqlite_insert(UsageRecord).on_conflict_do_nothing(index_elements=["request_id"])
        else:
            stmt = insert(UsageRecord)
        async with self._engine.begin() as conn:
            await conn.execute(stmt, list(rows))

    async def ping(self) -> None:
        """One round trip (`SELECT 1`); raises when the database is unreachable."""
        async with self._engine.connect() as conn:
            await conn.execute(select(1))

    async def count(self) -> int:
        async with self._sessions() as session:
            return int((await session.execute(select(func.count()).select_from(UsageRecord))).scalar_one())

    async def summary(
        self,
        *,
        group_by: Iterable[str] = ("day", "model"),
        key_id: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 10_000,
    ) -> list[UsageRow]:
        """Totals grouped by any of day (UTC), model, key, endpoint; newest day first."""
        groups = [g.strip() for g in group_by if g.strip()]
        unknown = [g for g in groups if g not in GROUP_BY_FIELDS]
        if unknown:
            raise ValueError(f"unknown group_by field(s) {unknown}; valid: {list(GROUP_BY_FIELDS)}")
        columns = {
            "day": func.date(UsageRecord.created_at).label("day"),
            "model": UsageRecord.model.label("model"),
            "key": UsageRecord.key_id.label("key_id"),
            "endpoint": UsageRecord.endpoint.label("endpoint"),
        }
        selected = [columns[g] for g in GROUP_BY_FIELDS if g in groups]
        stmt: Select[Any] = select(
            *selected,
            func.count().label("requests"),
            func.coalesce(func.sum(UsageRecord.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(UsageRecord.completion_tokens), 0).label("completion_tokens"),
            func.coalesce(func.sum(UsageRecord.cached_tokens), 0).label("cached_tokens"),
            func.coalesce(func.sum(UsageRecord.reasoning_tokens), 0).label("reasoning_tokens"),
            func.coalesce(func.sum(case((UsageRecord.status >= 400, 1), else_=0)), 0).label("errors"),
        )
        if key_id is not None:
            stmt = stmt.where(UsageRecord.key_id == key_id)
        if since is not None:
            stmt = stmt.where(UsageRecord.created_at >= since)
        if until is not None:
            stmt = stmt.where(UsageRecord.created_at < until)
        if selected:
            stmt = stmt.group_by(*selected)
            order = [c.desc() if c.name == "day" else c.asc() for c in selected]
            stmt = stmt.order_by(*order)
        stmt = stmt.limit(limit)
        async with self._sessions() as session:
            result = await session.execute(stmt)
            out = []
            for row in result.mappings():
                day = row.get("day")
                out.append(
                    UsageRow(
                        day=str(day) if day is not None else None,
                        model=row.get("model"),
                        key_id=int(row["key_id"]) if row.get("key_id") is not None else None,
                        endpoint=row.get("endpoint"),
                        requests=int(row["requests"]),
                        prompt_tokens=int(row["prompt_tokens"]),
                        completion_tokens=int(row["completion_tokens"]),
                        cached_tokens=int(row["cached_tokens"]),
                        reasoning_tokens=int(row["reasoning_tokens"]),
                        errors=int(row["errors"]),
                    )
                )
            return out
