"""Repositories against real MariaDB and SQLite (the same tests, parametrized): keys and the key
lookup, usage insert/summary, conversations and their ownership, retention purge."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio
from sqlalchemy import select, text

from deepseek_serve.storage import Storage, migrate
from deepseek_serve.storage.conversations import ConversationNotFound, chat_history
from deepseek_serve.storage.db import create_db_engine, create_session_factory
from deepseek_serve.storage.key_lookup import KeyLookup, KeyStatus, KeyStoreUnavailable
from deepseek_serve.storage.keys import KeyRepository, generate_secret
from deepseek_serve.storage.models import ApiKey, Conversation, Message, UsageRecord, utcnow
from deepseek_serve.storage.retention import parse_duration, purge
from deepseek_serve.storage.runtime import StorageStartError
from deepseek_serve.storage.usage import event_to_row
from tests.support.net import free_port
from tests.support.storage import BACKENDS, database_url, storage_settings


@pytest_asyncio.fixture(scope="module", params=BACKENDS)
async def migrated_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """One migrated database per backend for the whole module."""
    tmp = tmp_path_factory.mktemp(f"db-{request.param}")
    async with database_url(request.param, tmp) as url:
        engine = create_db_engine(storage_settings(tmp, url), url=url)
        await migrate.upgrade(engine)
        await engine.dispose()
        yield url


@pytest_asyncio.fixture
async def storage(migrated_url: str, tmp_path: Path) -> AsyncIterator[Storage]:
    st = Storage(storage_settings(tmp_path, migrated_url))
    async with st.engine.begin() as conn:  # each test starts from empty tables
        for table in ("messages", "conversations", "usage_records", "api_keys"):
            await conn.execute(text(f"DELETE FROM {table}"))
    await st.start(migrate_schema=False)
    yield st
    await st.close()


# --- keys --------------------------------------------------------------------------------------------
async def test_key_is_stored_hashed_and_checks(storage: Storage) -> None:
    created = await storage.keys.create("alice", rpm_limit=60, tpm_limit=1000)
    secret = created.secret
    assert secret.startswith("sk-") and len(secret) == 51
    assert set(secret[3:]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    async with storage.sessions() as session:
        row = (await session.execute(select(ApiKey))).scalar_one()
    # only the hash and an 8-character prefix are stored, never the secret
    assert row.key_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert row.prefix == secret[3:11]
    assert all(secret not in str(v) for v in vars(row).values())
    check = await storage.key_lookup.check(secret)
    assert check.status is KeyStatus.OK and check.key is not None
    assert check.key.scopes == frozenset({"inference"}) and check.key.rpm_limit == 60
    assert (
        await storage.key_lookup.check(secret[:-1] + ("A" if secret[-1] != "A" else "B"))
    ).status is KeyStatus.INVALID
    assert (await storage.key_lookup.check("not-a-key")).status is KeyStatus.INVALID
    assert (await storage.key_lookup.check(generate_secret())).status is KeyStatus.INVALID


async def test_admin_scope_expiry_and_revocation(storage: Storage) -> None:
    admin = await storage.keys.create("ops", admin=True)
    assert admin.info.scopes == frozenset({"inference", "admin"})
    short = await storage.keys.create("short", expires_in=timedelta(seconds=1))
    async with storage.engine.begin() as conn:  # move its expiry into the past
        await conn.execute(
            text("UPDATE api_keys SET expires_at = :t WHERE id = :i"),
            {"t": utcnow() - timedelta(seconds=5), "i": short.info.id},
        )
    fresh = KeyLookup(storage.keys, ttl_s=30)
    assert (await fresh.check(short.secret)).status is KeyStatus.EXPIRED
    await storage.keys.revoke(admin.info.id)
    assert (await fresh.check(admin.secret)).status is KeyStatus.REVOKED
    listed = {k.id for k in await storage.keys.list()}
    assert admin.info.id not in listed and short.info.id in listed
    assert admin.info.id in {k.id for k in await storage.keys.list(include_revoked=True)}
    assert await storage.keys.revoke(10**9) is None


async def test_lookup_cache_ttl_and_invalidate(storage: Storage) -> None:
    created = await storage.keys.create("bob")
    cached = KeyLookup(storage.keys, ttl_s=60)
    uncached = KeyLookup(storage.keys, ttl_s=0)
    assert (await cached.check(created.secret)).status is KeyStatus.OK
    # revoked elsewhere (another process): the cache still answers OK until its TTL ...
    await KeyRepository(storage.sessions).revoke(created.info.id)
    assert (await cached.check(created.secret)).status is KeyStatus.OK
    assert (await uncached.check(created.secret)).status is KeyStatus.REVOKED
    # ... while a revoke in this process invalidates at once
    cached.invalidate(created.info.id)
    assert (await cached.check(created.secret)).status is KeyStatus.REVOKED


async def test_last_used_is_written_lazily(storage: Storage) -> None:
    created = await storage.keys.create("carol")
    lookup = KeyLookup(storage.keys, ttl_s=60, touch_interval_s=60)
    for _ in range(5):
        await lookup.check(created.secret)
    assert lookup.pending_touches() == 1
    assert (await storage.keys.get(created.info.id)).last_used_at is None  # type: ignore[union-attr]
    await lookup.flush_touches()
    assert lookup.pending_touches() == 0
    info = await storage.keys.get(created.info.id)
    assert info is not None and info.last_used_at is not None
    assert abs((utcnow() - info.last_used_at).total_seconds()) < 60
    await lookup.check(created.secret)  # within the minute: no new write queued
    assert lookup.pending_touches() == 0


async def test_bootstrap_admin_key_upsert_and_rotation(storage: Storage) -> None:
    first, second = generate_secret(), generate_secret()
    a = await storage.keys.ensure_bootstrap_admin(first)
    b = await storage.keys.ensure_bootstrap_admin(first)
    assert a.id == b.id and a.scopes == frozenset({"inference", "admin"})
    c = await storage.keys.ensure_bootstrap_admin(second)
    assert c.id != a.id
    lookup = KeyLookup(storage.keys, ttl_s=0)
    assert (await lookup.check(second)).status is KeyStatus.OK
    assert (await lookup.check(first)).status is KeyStatus.REVOKED


# --- usage -------------------------------------------------------------------------------------------
def _event(
    request_id: str,
    key_id: int | None,
    model: str,
    *,
    prompt: int = 10,
    completion: int = 5,
    status: int = 200,
    when: datetime | None = None,
) -> dict[str, object]:
    ts = ((when or utcnow()) - datetime(1970, 1, 1)).total_seconds()
    return {
        "request_id": request_id,
        "key_id": None if key_id is None else str(key_id),
        "model": model,
        "endpoint": "chat.completions",
        "status": status,
        "finish_reason": "stop",
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_tokens": 2,
        "reasoning_tokens": 1,
        "queue_ms": 1.5,
        "first_token_ms": 20.0,
        "total_ms": 40.0,
        "prompt_text": "hi",
        "completion_text": "hello",
        "created_at": ts,
    }


async def test_usage_insert_is_idempotent_and_drops_text(storage: Storage) -> None:
    rows = [event_to_row(_event(f"req-{i}", 1, "m"), store_content=False) for i in range(5)]
    await storage.usage.insert_many(rows)
    await storage.usage.insert_many([*rows[2:], event_to_row(_event("req-new", 1, "m"), False)])
    assert await storage.usage.count() == 6
    async with storage.sessions() as session:
        texts = (await session.execute(select(UsageRecord.prompt_text, UsageRecord.completion_text))).all()
    assert all(p is None and c is None for p, c in texts)
    await storage.usage.insert_many([event_to_row(_event("req-content", 1, "m"), store_content=True)])
    async with storage.sessions() as session:
        kept = (
            await session.execute(select(UsageRecord.prompt_text).where(UsageRecord.request_id == "req-content"))
        ).scalar_one()
    assert kept == "hi"


async def test_usage_summary_groups_and_filters(storage: Storage) -> None:
    today = utcnow().replace(hour=12, minute=0, second=0, microsecond=0)
    yesterday = today - timedelta(days=1)
    events = [
        _event("a1", 1, "small", when=today),
        _event("a2", 1, "small", when=today),
        _event("a3", 1, "big", prompt=100, completion=50, when=today),
        _event("a4", 1, "small", when=yesterday, status=500, completion=0),
        _event("b1", 2, "small", prompt=7, completion=3, when=today),
        _event("anon", None, "small", when=yesterday),
    ]
    await storage.usage.insert_many([event_to_row(e, False) for e in events])
    rows = await storage.usage.summary(group_by=["day", "model"], key_id=1)
    table = {(r.day, r.model): r for r in rows}
    assert set(table) == {(str(today.date()), "small"), (str(today.date()), "big"), (str(yesterday.date()), "small")}
    assert rows[0].day == str(today.date())  # newest day first
    small_today = table[(str(today.date()), "small")]
    assert (small_today.requests, small_today.prompt_tokens, small_today.completion_tokens) == (2, 20, 10)
    assert small_today.cached_tokens == 4 and small_today.reasoning_tokens == 2 and small_today.errors == 0
    assert table[(str(yesterday.date()), "small")].errors == 1
    by_key = {r.key_id: r for r in await storage.usage.summary(group_by=["key"])}
    assert by_key[2].requests == 1 and by_key[2].total_tokens == 10
    assert by_key[None].requests == 1 and by_key[1].requests == 4
    since = await storage.usage.summary(group_by=["model"], since=today - timedelta(hours=1))
    assert sum(r.requests for r in since) == 4
    with pytest.raises(ValueError, match="unknown group_by"):
        await storage.usage.summary(group_by=["colour"])


# --- conversations -----------------------------------------------------------------------------------
async def test_conversations_roundtrip_utf8mb4(storage: Storage) -> None:
    owner = (await storage.keys.create("alice")).info.id
    conv = await storage.conversations.create(owner, messages=[{"role": "system", "content": "Be brief."}])
    assert conv.id.startswith("conv_") and conv.num_messages == 1
    text_zh = "你好，世界！请用中文回答 🙂🚀 (emoji outside the BMP need utf8mb4)"
    await storage.conversations.append(
        owner,
        conv.id,
        [
            {"role": "user", "content": text_zh},
            {
                "role": "assistant",
                "content": "好的 👍",
                "reasoning_content": "思考…",
                "prompt_tokens": 12,
                "completion_tokens": 3,
            },
        ],
    )
    messages = await storage.conversations.messages(owner, conv.id)
    assert [m.role for m in messages] == ["system", "user", "assistant"]
    assert messages[1].content == text_zh and messages[2].content == "好的 👍"
    assert messages[2].reasoning_content == "思考…" and messages[2].completion_tokens == 3
    assert chat_history(messages)[2] == {"role": "assistant", "content": "好的 👍"}
    info = await storage.conversations.get(owner, conv.id)
    assert info.title == text_zh[:80] and info.num_messages == 3 and info.updated_at >= info.created_at


async def test_conversations_are_private_to_their_owner(storage: Storage) -> None:
    alice = (await storage.keys.create("alice")).info.id
    bob = (await storage.keys.create("bob")).info.id
    conv = await storage.conversations.create(alice, title="alice's")
    anon = await storage.conversations.create(None, title="anonymous")
    for call in (
        storage.conversations.get(bob, conv.id),
        storage.conversations.messages(bob, conv.id),
        storage.conversations.append(bob, conv.id, [{"role": "user", "content": "x"}]),
        storage.conversations.delete(bob, conv.id),
        storage.conversations.get(None, conv.id),
        storage.conversations.get(alice, anon.id),
    ):
        with pytest.raises(ConversationNotFound):
            await call
    assert [c.id for c in await storage.conversations.list_for(alice)] == [conv.id]
    assert await storage.conversations.list_for(bob) == []
    assert [c.id for c in await storage.conversations.list_for(None)] == [anon.id]
    await storage.conversations.append(alice, conv.id, [{"role": "user", "content": "hi"}])
    await storage.conversations.delete(alice, conv.id)
    with pytest.raises(ConversationNotFound):
        await storage.conversations.get(alice, conv.id)
    async with storage.sessions() as session:
        left = (await session.execute(select(Message).where(Message.conversation_id == conv.id))).all()
    assert left == []


async def test_list_orders_by_last_update(storage: Storage) -> None:
    owner = (await storage.keys.create("alice")).info.id
    first = await storage.conversations.create(owner, title="first")
    second = await storage.conversations.create(owner, title="second")
    await storage.conversations.append(owner, first.id, [{"role": "user", "content": "bump"}])
    listed = await storage.conversations.list_for(owner)
    assert [c.id for c in listed] == [first.id, second.id]
    assert listed[0].num_messages == 1 and listed[1].num_messages == 0
    assert len(await storage.conversations.list_for(owner, limit=1)) == 1


# --- retention ---------------------------------------------------------------------------------------
async def test_purge_removes_only_old_rows(storage: Storage) -> None:
    now = utcnow()
    old, new = now - timedelta(days=100), now - timedelta(days=10)
    await storage.usage.insert_many(
        [event_to_row(_event(f"old-{i}", 1, "m", when=old), False) for i in range(30)]
        + [event_to_row(_event(f"new-{i}", 1, "m", when=new), False) for i in range(7)]
    )
    owner = (await storage.keys.create("alice")).info.id
    stale = await storage.conversations.create(owner, messages=[{"role": "user", "content": "old"}])
    live = await storage.conversations.create(owner, messages=[{"role": "user", "content": "new"}])
    async with storage.engine.begin() as conn:
        await conn.execute(text("UPDATE conversations SET updated_at = :t WHERE id = :i"), {"t": old, "i": stale.id})
    result = await purge(storage.sessions, parse_duration("90d"), chunk_size=8)  # several chunks
    assert (result.usage_records, result.conversations, result.messages) == (30, 1, 1)
    assert await storage.usage.count() == 7
    async with storage.sessions() as session:
        ids = set((await session.execute(select(Conversation.id))).scalars())
    assert ids == {live.id}
    again = await purge(storage.sessions, parse_duration("90d"))
    assert (again.usage_records, again.conversations) == (0, 0)


def test_parse_duration() -> None:
    assert parse_duration("90d") == timedelta(days=90)
    assert parse_duration("12h") == timedelta(hours=12)
    assert parse_duration(" 2w ") == timedelta(weeks=2)
    for bad in ("90", "d", "-1d", "0d", "1y", ""):
        with pytest.raises(ValueError):
            parse_duration(bad)


async def test_lookup_serves_cached_keys_while_the_database_is_down(storage: Storage, tmp_path: Path) -> None:
    created = await storage.keys.create("dave")
    lookup = KeyLookup(storage.keys, ttl_s=0.01)
    assert (await lookup.check(created.secret)).status is KeyStatus.OK
    # the key store becomes unreachable (a MySQL URL on a port nothing listens on)
    url = f"mysql+asyncmy://root@127.0.0.1:{free_port()}/gone"
    dead = create_db_engine(storage_settings(tmp_path, url, db_connect_timeout_s=1.0), url=url)
    lookup._repo = KeyRepository(create_session_factory(dead))
    try:
        await asyncio.sleep(0.05)  # past the TTL: a refresh is attempted and fails
        assert (await lookup.check(created.secret)).status is KeyStatus.OK  # stale entry served
        with pytest.raises(KeyStoreUnavailable):
            await lookup.check(generate_secret())  # never seen: cannot be answered
    finally:
        await dead.dispose()


async def test_daily_purge_runs_at_start(migrated_url: str, tmp_path: Path) -> None:
    st = Storage(storage_settings(tmp_path, migrated_url, purge_daily=True, retention_days=30))
    await st.usage.insert_many(
        [
            event_to_row(_event("ancient", 1, "m", when=utcnow() - timedelta(days=31)), False),
            event_to_row(_event("recent", 1, "m", when=utcnow() - timedelta(days=29)), False),
        ]
    )
    await st.start(migrate_schema=False)
    try:
        for _ in range(100):
            async with st.sessions() as session:
                ids = set((await session.execute(select(UsageRecord.request_id))).scalars())
            if "ancient" not in ids:
                break
            await asyncio.sleep(0.05)
        assert "ancient" not in ids and "recent" in ids
    finally:
        await st.close()


async def test_start_names_an_unreachable_database_without_its_password(tmp_path: Path) -> None:
    url = f"mysql+asyncmy://app:s3cret@127.0.0.1:{free_port()}/app"
    st = Storage(storage_settings(tmp_path, url, db_auto_migrate=True, db_connect_timeout_s=1.0))
    with pytest.raises(StorageStartError) as info:
        await st.start()
    assert "127.0.0.1" in str(info.value) and "s3cret" not in str(info.value)
    await st.engine.dispose()
