"""The usage writer: batches, the spool while the database is unreachable, idempotent replay, and
zero records lost across a real MariaDB outage (a private mariadbd killed and restarted)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from sqlalchemy import select, text

from deepseek_serve.contracts import UsageEvent, UsageWriterState
from deepseek_serve.storage import migrate
from deepseek_serve.storage.db import create_db_engine, create_session_factory
from deepseek_serve.storage.models import UsageRecord
from deepseek_serve.storage.spool import Spool
from deepseek_serve.storage.usage import UsageRepository, event_to_row
from deepseek_serve.storage.writer import UsageWriter
from tests.support.net import free_port
from tests.support.storage import BACKENDS, PrivateMariaDB, database_url, storage_settings


def event(request_id: str, key_id: int | None = 1) -> UsageEvent:
    return UsageEvent(
        request_id=request_id,
        key_id=key_id,
        model="smollm2",
        endpoint="chat.completions",
        status=200,
        finish_reason="length",
        prompt_tokens=12,
        completion_tokens=1,
        created_at=time.time(),
    )


def make_writer(repo: UsageRepository, spool_path: Path, batch_size: int = 200) -> UsageWriter:
    return UsageWriter(
        repo, Spool(spool_path), flush_interval_s=0.05, batch_size=batch_size, write_timeout_s=5, max_retry_s=0.3
    )


async def wait_until(predicate: object, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


@pytest_asyncio.fixture(params=BACKENDS)
async def repo(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[UsageRepository]:
    async with database_url(request.param, tmp_path) as url:
        engine = create_db_engine(storage_settings(tmp_path, url), url=url)
        await migrate.upgrade(engine)
        yield UsageRepository(engine, create_session_factory(engine))
        await engine.dispose()


async def request_ids(repo: UsageRepository) -> list[str]:
    async with create_session_factory(repo._engine)() as session:
        return list((await session.execute(select(UsageRecord.request_id))).scalars())


def spooled_ids(folder: Path) -> list[str]:
    """Request ids on disk: the spool plus files a replay attempt claimed (kept until written)."""
    files = [p for p in [folder / "spool.jsonl", *folder.glob("spool.jsonl.*.replay")] if p.exists()]
    return [json.loads(line)["request_id"] for p in files for line in p.read_text().splitlines()]


def unreachable_repo(tmp_path: Path) -> UsageRepository:
    """A MySQL URL on a loopback port nothing listens on: connections are refused."""
    url = f"mysql+asyncmy://root@127.0.0.1:{free_port()}/nothing"
    engine = create_db_engine(storage_settings(tmp_path, url, db_connect_timeout_s=1.0), url=url)
    return UsageRepository(engine, create_session_factory(engine))


async def test_background_flush_in_batches(repo: UsageRepository, tmp_path: Path) -> None:
    writer = make_writer(repo, tmp_path / "spool.jsonl", batch_size=64)
    await writer.start()
    try:
        for i in range(300):
            writer.record(event(f"r{i}"))
        assert writer.backlog() == 300  # record() only queues
        await wait_until(lambda: writer.backlog() == 0)
    finally:
        await writer.stop()
    assert sorted(await request_ids(repo)) == sorted(f"r{i}" for i in range(300))
    assert writer.written_total == 300 and writer.spooled_total == 0
    assert not (tmp_path / "spool.jsonl").exists()


async def test_persisted_waits_for_the_write_not_the_flush_interval(repo: UsageRepository, tmp_path: Path) -> None:
    """The group commit a response waits on: with a 60 s flush interval, `persisted` has the writer
    write at once and returns only when the records are in the database."""
    writer = UsageWriter(repo, Spool(tmp_path / "spool.jsonl"), flush_interval_s=60, write_timeout_s=5)
    assert await writer.persisted(1.0)  # nothing queued
    writer.record(event("early"))
    assert not await writer.persisted(0.2)  # not started: the record stays queued
    await writer.start()
    try:
        await asyncio.sleep(0.1)  # the writer's first wait has begun
        writer.record(event("a"))
        writer.record(event("b"))
        started = time.monotonic()
        results = await asyncio.gather(writer.persisted(10.0), writer.persisted(10.0))
        assert results == [True, True]
        assert time.monotonic() - started < 5.0
        assert sorted(await request_ids(repo)) == ["a", "b", "early"]
        assert writer.backlog() == 0
    finally:
        await writer.stop()


async def test_persisted_counts_spooled_records(tmp_path: Path) -> None:
    """With the database unreachable a record is durable once it is in the (fsync'd) spool."""
    writer = UsageWriter(
        unreachable_repo(tmp_path),
        Spool(tmp_path / "spool.jsonl"),
        flush_interval_s=60,
        write_timeout_s=5,
        max_retry_s=0.3,
    )
    await writer.start()
    try:
        writer.record(event("s1"))
        assert await writer.persisted(20.0)
        assert spooled_ids(tmp_path) == ["s1"]
    finally:
        await writer.stop()


def test_spooled_key_id_is_read_as_int_or_text() -> None:
    """Spool lines hold the key id as a number, or as text in lines written by earlier versions."""
    for spooled in (7, "7"):
        assert event_to_row({**event("r").__dict__, "key_id": spooled}, False)["key_id"] == 7
    assert event_to_row(event("r", key_id=None), False)["key_id"] is None


async def test_unreachable_database_spools_and_next_start_replays(repo: UsageRepository, tmp_path: Path) -> None:
    spool_path = tmp_path / "spool.jsonl"
    down = make_writer(unreachable_repo(tmp_path), spool_path, batch_size=10)
    await down.start()
    for i in range(35):
        down.record(event(f"s{i}", key_id=None if i % 5 == 0 else 7))
    await wait_until(lambda: down.spool_backlog() == 35)
    assert not down.database_reachable and down.queue_depth() == 0
    assert down.metrics_snapshot() == UsageWriterState(
        spool_backlog=35,
        queue_depth=0,
        database_reachable=False,
        written_total=0,
        spooled_total=35,
        rejected_total=0,
    )
    await down.stop()  # nothing lost at shutdown either: still on disk
    # on disk: the spool, plus files a failed replay attempt claimed (kept until written)
    assert sorted(spooled_ids(tmp_path)) == sorted(f"s{i}" for i in range(35))
    await down._repo._engine.dispose()

    # a later process with the database back replays the spool at start
    up = make_writer(repo, spool_path)
    await up.start()
    try:
        assert up.backlog() == 35
        await wait_until(lambda: up.backlog() == 0)
    finally:
        await up.stop()
    assert sorted(await request_ids(repo)) == sorted(f"s{i}" for i in range(35))
    assert spooled_ids(tmp_path) == []


async def test_replay_after_partial_failure_inserts_no_duplicates(repo: UsageRepository, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.jsonl")
    records = [{**event(f"p{i}").__dict__} for i in range(40)]
    spool.append(records[:25])
    spool.append(records[25:])
    # a replay that died after writing part of the records (the spool file was kept)
    await repo.insert_many([event_to_row(r, False) for r in records[5:20]])
    with spool.path.open("a") as f:
        f.write('{"request_id": "torn-by-a-cr')  # a crash mid-append leaves a torn last line
    writer = make_writer(repo, spool.path)
    await writer.start()
    try:
        await wait_until(lambda: writer.backlog() == 0)
    finally:
        await writer.stop()
    ids = await request_ids(repo)
    assert len(ids) == 40 and set(ids) == {f"p{i}" for i in range(40)}


async def test_zero_records_lost_across_a_mariadb_outage(tmp_path: Path) -> None:
    """Records keep coming while the server is killed (SIGKILL) and restarted: rows == records."""
    server = PrivateMariaDB(tmp_path / "mariadb")
    server.install()
    server.start()
    try:
        engine = create_db_engine(storage_settings(tmp_path, server.url()), url=server.url())
        async with engine.begin() as conn:
            await conn.execute(text("CREATE DATABASE usage_outage"))
        await engine.dispose()
        url = server.url("usage_outage")
        engine = create_db_engine(storage_settings(tmp_path, url, db_connect_timeout_s=1.0), url=url)
        await migrate.upgrade(engine)
        repo = UsageRepository(engine, create_session_factory(engine))
        writer = make_writer(repo, tmp_path / "spool.jsonl", batch_size=20)
        await writer.start()
        sent: list[str] = []
        for i in range(400):  # ~4 s of traffic, 100 records/s
            rid = f"outage-{uuid.uuid4().hex}"
            writer.record(event(rid))
            sent.append(rid)
            if i == 100:
                server.kill()
            if i == 250:
                assert writer.spool_backlog() > 0, "the outage should have sent records to the spool"
                server.start()
            await asyncio.sleep(0.01)
        await wait_until(lambda: writer.backlog() == 0, timeout_s=60)
        await writer.stop()
        ids = await request_ids(repo)
        assert len(ids) == len(sent) and set(ids) == set(sent)
        assert writer.spooled_total > 0 and writer.rejected_total == 0
        await engine.dispose()
    finally:
        server.stop()
