"""UsageWriter: the `UsageSink` behind the API; records usage off the request path, losing none.

`record()` appends the event to an in-memory queue and returns. A background task writes batches
every `flush_interval_s`, or as soon as `batch_size` records wait. If the database cannot be
reached the batch is appended to the spool (storage/spool.py) and the writer keeps spooling,
retrying the database with backoff (at most `max_retry_s` apart); when it answers, the spool is
replayed first, then the queue. `stop()` flushes what is left (to the database or the spool).

`persisted()` is the group commit a response waits on: it wakes the writer at once and returns when
every record queued so far is in the database or the spool, so a client never sees a success whose
record a crash could still lose. Concurrent requests share one batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

from deepseek_serve.contracts import UsageWriterState
from deepseek_serve.storage.spool import Spool
from deepseek_serve.storage.usage import UsageRepository, event_to_row

if TYPE_CHECKING:
    from deepseek_serve.contracts import UsageEvent

logger = logging.getLogger(__name__)

# errors that mean "the database is not there", as opposed to "this row is wrong"
_UNREACHABLE = (OperationalError, InterfaceError, DisconnectionError, OSError, TimeoutError, asyncio.TimeoutError)


class UsageWriter:
    def __init__(
        self,
        repo: UsageRepository,
        spool: Spool,
        *,
        flush_interval_s: float = 1.0,
        batch_size: int = 200,
        store_content: bool = False,
        write_timeout_s: float = 15.0,
        max_retry_s: float = 5.0,
    ) -> None:
        self._repo = repo
        self._spool = spool
        self._flush_interval_s = flush_interval_s
        self._batch_size = batch_size
        self._store_content = store_content
        self._write_timeout_s = write_timeout_s
        self._max_retry_s = max_retry_s
        self._queue: deque[dict[str, Any]] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._spooled = 0  # records on disk (spool + claimed files)
        self._in_flight = 0  # records taken from the queue, not yet written or spooled
        self._stopping = False
        self._db_down = False
        self._queued_total = 0  # records ever queued
        self._done_total = 0  # of those, the first ones (queue order) written, spooled or set aside
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._retry_delay_s = flush_interval_s
        self._next_retry = 0.0
        # counters, for metrics and tests
        self.written_total = 0
        self.spooled_total = 0
        self.rejected_total = 0

    # --- the sink -------------------------------------------------------------------------------
    def record(self, event: UsageEvent) -> None:
        """Queue a record; never blocks, never raises."""
        try:
            # a shallow copy: the fields are plain values (dataclasses.asdict deep-copies, 30x slower)
            data = dict(vars(event)) if hasattr(event, "__dict__") else dataclasses.asdict(event)
            if not data.get("created_at"):
                data["created_at"] = time.time()
            self._queue.append(data)
            self._queued_total += 1
            if len(self._queue) >= self._batch_size and self._wake is not None:
                self._wake.set()
        except Exception:  # the request path must never fail on accounting
            logger.exception("usage: could not queue a record")

    async def persisted(self, timeout_s: float) -> bool:
        """Wait until every record queued so far is in the database or the spool; the writer writes at
        once. False after `timeout_s` or when the writer is not running (the records stay queued)."""
        target = self._queued_total
        if self._done_total >= target:
            return True
        if self._wake is None or self._task is None:
            return False
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, done))
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout_s)
        except TimeoutError:
            return False
        return True

    def _advance(self, count: int) -> None:
        self._done_total += count
        pending = []
        for target, done in self._waiters:
            if target <= self._done_total:
                if not done.done():
                    done.set_result(None)
            else:
                pending.append((target, done))
        self._waiters = pending

    def backlog(self) -> int:
        """Records not yet in the database: queued in memory plus spooled on disk."""
        return len(self._queue) + self._in_flight + self._spooled

    def spool_backlog(self) -> int:
        """Records spooled on disk, waiting for the database (the `ds_usage_spool_backlog` gauge)."""
        return self._spooled

    def queue_depth(self) -> int:
        """Records in memory: queued for the next batch or being written."""
        return len(self._queue) + self._in_flight

    @property
    def database_reachable(self) -> bool:
        return not self._db_down

    def metrics_snapshot(self) -> UsageWriterState:
        """What `/metrics` exports of the writer."""
        return UsageWriterState(
            spool_backlog=self._spooled,
            queue_depth=self.queue_depth(),
            database_reachable=not self._db_down,
            written_total=self.written_total,
            spooled_total=self.spooled_total,
            rejected_total=self.rejected_total,
        )

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Count what an earlier run left in the spool and start the background task."""
        if self._task is not None:
            return
        self._spooled = await asyncio.to_thread(self._spool.size)
        self._stopping = False
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="usage-writer")

    async def stop(self) -> None:
        """Stop the background task and write (or spool) everything still queued."""
        if self._task is not None:
            # no cancel: a batch being written finishes (or is spooled) before the task ends
            self._stopping = True
            assert self._wake is not None
            self._wake.set()
            await self._task
            self._task = None
        self._next_retry = 0.0
        await self.flush()

    async def _run(self) -> None:
        assert self._wake is not None
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), self._flush_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # keep the writer alive whatever happens
                logger.exception("usage: flush failed")

    # --- writing --------------------------------------------------------------------------------
    async def flush(self) -> None:
        """Replay the spool if due, then write the queue in batches (spooling on failure)."""
        async with self._lock:
            if self._spooled and time.monotonic() >= self._next_retry:
                await self._replay()
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(self._batch_size, len(self._queue)))]
                self._in_flight = len(batch)
                try:
                    # while the database is down (or older records wait in the spool) new records go
                    # straight to the spool, keeping the request order and sparing a dead server.
                    if self._spooled or self._db_down or not await self._write(batch):
                        await self._to_spool(batch)
                    self._advance(len(batch))
                except BaseException:
                    self._queue.extendleft(reversed(batch))  # spool unwritable: keep them for the next try
                    raise
                finally:
                    self._in_flight = 0

    async def _to_spool(self, batch: list[dict[str, Any]]) -> None:
        await asyncio.to_thread(self._spool.append, batch)
        self._spooled += len(batch)
        self.spooled_total += len(batch)

    async def _write(self, batch: list[dict[str, Any]]) -> bool:
        """Insert a batch; False when the database is unreachable (the caller spools it)."""
        rows = [event_to_row(d, self._store_content) for d in batch]
        try:
            try:
                await asyncio.wait_for(self._repo.insert_many(rows), self._write_timeout_s)
            except _UNREACHABLE:
                raise
            except Exception:  # a bad row must not block the others
                logger.exception("usage: batch insert failed; retrying row by row")
                await self._write_one_by_one(batch, rows)
        except _UNREACHABLE as exc:
            self._mark_down(exc)
            return False
        self._mark_up()
        self.written_total += len(batch)
        return True

    async def _write_one_by_one(self, batch: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
        rejected: list[dict[str, Any]] = []
        for data, row in zip(batch, rows, strict=True):
            try:
                await self._repo.insert_many([row])
            except _UNREACHABLE:
                raise
            except Exception:
                rejected.append(data)
        if rejected:
            # dead letters: kept on disk next to the spool for a human, never replayed automatically
            dead = Spool(self._spool.path.with_name(self._spool.path.name + ".rejected"))
            await asyncio.to_thread(dead.append, rejected)
            self.rejected_total += len(rejected)
            logger.error("usage: %d record(s) rejected by the database, kept in %s", len(rejected), dead.path)

    async def _replay(self) -> None:
        try:  # before claiming, so a long outage does not leave one claimed file per retry
            await asyncio.wait_for(self._repo.ping(), self._write_timeout_s)
        except _UNREACHABLE as exc:
            self._mark_down(exc)
            return
        files: list[Path] = await asyncio.to_thread(self._spool.claim)
        for path in files:
            records = await asyncio.to_thread(Spool.read, path)
            for start in range(0, len(records), self._batch_size):
                chunk = records[start : start + self._batch_size]
                rows = [event_to_row(d, self._store_content) for d in chunk]
                try:
                    try:
                        await asyncio.wait_for(self._repo.insert_many(rows), self._write_timeout_s)
                    except _UNREACHABLE:
                        raise
                    except Exception:  # a bad row must not block the others
                        await self._write_one_by_one(chunk, rows)
                except _UNREACHABLE as exc:
                    self._mark_down(exc)
                    return  # the file stays; the next replay reads it again (idempotent)
            await asyncio.to_thread(Spool.discard, path)
            self._spooled = max(self._spooled - len(records), 0)
            self.written_total += len(records)
            logger.info("usage: replayed %d spooled record(s) from %s", len(records), path.name)
        self._mark_up()
        self._spooled = 0

    def _mark_down(self, exc: BaseException) -> None:
        if not self._db_down:
            logger.warning("usage: database unreachable (%s); spooling to %s", exc, self._spool.path)
            self._retry_delay_s = self._flush_interval_s
        else:
            self._retry_delay_s = min(self._retry_delay_s * 2, self._max_retry_s)
        self._db_down = True
        self._next_retry = time.monotonic() + self._retry_delay_s

    def _mark_up(self) -> None:
        if self._db_down:
            logger.info("usage: database reachable again")
        self._db_down = False
        self._retry_delay_s = self._flush_interval_s
