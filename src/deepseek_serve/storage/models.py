"""ORM models: api_keys, usage_records, conversations, messages.

Types are chosen so the same schema works on MySQL 8, MariaDB 10.11 and SQLite: bounded
`String` lengths, `DateTime` holding naive UTC (microseconds on MySQL/MariaDB), BigInteger
autoincrement ids (plain INTEGER on SQLite, where only that type autoincrements), long text as
MEDIUMTEXT on MySQL. The schema itself only changes through Alembic (storage/migrations/).
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# fixed constraint names, so migrations can address them on every backend. Primary keys stay
# unnamed: MySQL ignores (and warns about) primary key names.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
}

Id = BigInteger().with_variant(Integer(), "sqlite")
Timestamp = DateTime(timezone=False).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
LongText = Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")

SCOPE_INFERENCE = "inference"
SCOPE_ADMIN = "admin"
ALL_SCOPES = (SCOPE_INFERENCE, SCOPE_ADMIN)


def utcnow() -> datetime:
    """Naive UTC now: the only kind of datetime stored."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ApiKey(Base):
    """An API key. Only the SHA-256 of the secret is stored; `prefix` is shown to humans."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[str] = mapped_column(String(64))  # comma-separated, e.g. "inference,admin"
    rpm_limit: Mapped[int | None] = mapped_column(Integer)
    tpm_limit: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(Timestamp)
    revoked_at: Mapped[datetime | None] = mapped_column(Timestamp)
    last_used_at: Mapped[datetime | None] = mapped_column(Timestamp)

    @property
    def scope_set(self) -> frozenset[str]:
        return frozenset(s for s in self.scopes.split(",") if s)


class UsageRecord(Base):
    """One served request. Text columns stay NULL unless settings.store_content."""

    __tablename__ = "usage_records"
    __table_args__ = (
        Index("ix_usage_records_created_at", "created_at"),
        Index("ix_usage_records_key_id_created_at", "key_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    # unique, so replaying the spool after a partial failure inserts no duplicates.
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    # no foreign key: a usage write must never fail on a key's lifecycle (keys are only revoked).
    key_id: Mapped[int | None] = mapped_column(BigInteger)
    model: Mapped[str] = mapped_column(String(128))
    endpoint: Mapped[str] = mapped_column(String(32))
    status: Mapped[int] = mapped_column(SmallInteger)
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cached_tokens: Mapped[int] = mapped_column(Integer, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(Integer, default=0)
    queue_ms: Mapped[float | None] = mapped_column(Float)
    first_token_ms: Mapped[float | None] = mapped_column(Float)
    total_ms: Mapped[float | None] = mapped_column(Float)
    prompt_text: Mapped[str | None] = mapped_column(LongText)
    completion_text: Mapped[str | None] = mapped_column(LongText)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class Conversation(Base):
    """A server-side conversation owned by one key (NULL owner = anonymous, auth off)."""

    __tablename__ = "conversations"
    __table_args__ = (
        Index("ix_conversations_key_id_updated_at", "key_id", "updated_at"),
        Index("ix_conversations_updated_at", "updated_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # "conv_..."
    key_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("api_keys.id", ondelete="CASCADE"))
    title: Mapped[str | None] = mapped_column(String(255))
    # OpenAI's `metadata`: a JSON object of at most 16 string pairs (checked by the API), NULL for none.
    # The attribute is not called `metadata`, which SQLAlchemy's declarative base reserves.
    meta: Mapped[str | None] = mapped_column("metadata", Text)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class Message(Base):
    """One item of a conversation; order is `id` order.

    `item_type` NULL is a message (`role`, `content`); "function_call" is one tool call of the
    assistant (`call_id`, `name`, the arguments JSON in `content`); "function_call_output" a tool
    result (`call_id`, the output in `content`, role "tool").
    """

    __tablename__ = "messages"
    __table_args__ = (Index("ix_messages_conversation_id_id", "conversation_id", "id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(String(64), ForeignKey("conversations.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(LongText)
    reasoning_content: Mapped[str | None] = mapped_column(LongText)
    item_type: Mapped[str | None] = mapped_column(String(24))
    call_id: Mapped[str | None] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(128))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
