"""Storage: the persistence layer as one object the server starts and stops.

Owns the database engine, the repositories, the usage writer, the key lookup and the background
tasks (usage flushing, `last_used_at` writes, the daily purge). `start()` migrates when
`settings.effective_auto_migrate`, upserts the bootstrap admin key, replays any spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from deepseek_serve.contracts import StorageState
from deepseek_serve.storage import migrate
from deepseek_serve.storage.conversations import ConversationRepository
from deepseek_serve.storage.db import create_db_engine, create_session_factory, max_overflow_of, pool_state
from deepseek_serve.storage.key_lookup import KeyLookup
from deepseek_serve.storage.keys import KeyRepository
from deepseek_serve.storage.retention import purge
from deepseek_serve.storage.spool import Spool
from deepseek_serve.storage.usage import UsageRepository
from deepseek_serve.storage.writer import UsageWriter

if TYPE_CHECKING:
    from deepseek_serve.config import Settings

logger = logging.getLogger(__name__)

TOUCH_FLUSH_INTERVAL_S = 10.0
PURGE_INTERVAL_S = 24 * 3600.0


class StorageStartError(RuntimeError):
    """The database could not be reached or migrated at start."""


class Storage:
    def __init__(self, settings: Settings, url: str | None = None) -> None:
        self.settings = settings
        self.engine = create_db_engine(settings, url=url)
        self.sessions = create_session_factory(self.engine)
        self.keys = KeyRepository(self.sessions)
        self.usage = UsageRepository(self.engine, self.sessions)
        self.conversations = ConversationRepository(self.sessions)
        self.key_lookup = KeyLookup(self.keys, ttl_s=settings.key_cache_ttl_s)
        self.writer = UsageWriter(
            self.usage,
            Spool(settings.effective_spool_path),
            flush_interval_s=settings.usage_flush_interval_s,
            batch_size=settings.usage_batch_size,
            store_content=settings.store_content,
            write_timeout_s=settings.db_pool_timeout_s + settings.db_connect_timeout_s,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._max_overflow = max_overflow_of(settings, url)

    def metrics_snapshot(self) -> StorageState:
        """What `/metrics` exports of the storage layer: the connection pool and the usage writer."""
        return StorageState(pool=pool_state(self.engine, self._max_overflow), usage=self.writer.metrics_snapshot())

    async def start(self, *, migrate_schema: bool | None = None) -> None:
        """Migrate (if asked or `effective_auto_migrate`), bootstrap the admin key, start background work.

        Raises StorageStartError, naming the database (password hidden), when it cannot be reached.
        """
        try:
            await self._prepare(migrate_schema)
        except (DBAPIError, OSError, TimeoutError) as exc:
            url = make_url(self.settings.effective_database_url).render_as_string(hide_password=True)
            raise StorageStartError(f"database {url}: {getattr(exc, 'orig', None) or exc}") from exc
        await self.writer.start()
        self._tasks.append(asyncio.create_task(self._touch_loop(), name="key-touch"))
        if self.settings.purge_daily:
            self._tasks.append(asyncio.create_task(self._purge_loop(), name="retention-purge"))

    async def _prepare(self, migrate_schema: bool | None) -> None:
        if self.settings.effective_auto_migrate if migrate_schema is None else migrate_schema:
            await migrate.upgrade(self.engine)
        if self.settings.admin_key:
            await self.keys.ensure_bootstrap_admin(self.settings.admin_key)
        elif self.settings.auth_enabled and not any(
            "admin" in k.scopes and not k.is_expired() for k in await self.keys.list()
        ):
            logger.warning(
                "auth is on and no admin key exists: set DS_ADMIN_KEY or run `deepseek-serve keys create --admin`"
            )

    async def close(self) -> None:
        """Stop background work, write what is pending (or spool it), release the pool."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.writer.stop()
        try:
            await self.key_lookup.flush_touches()
        except Exception:  # last_used_at is best effort
            logger.warning("could not write last_used_at at shutdown", exc_info=True)
        await self.engine.dispose()

    async def _touch_loop(self) -> None:
        while True:
            await asyncio.sleep(TOUCH_FLUSH_INTERVAL_S)
            try:
                await self.key_lookup.flush_touches()
            except Exception:
                logger.warning("could not write last_used_at; will retry", exc_info=True)

    async def _purge_loop(self) -> None:
        while True:
            try:
                result = await purge(self.sessions, timedelta(days=self.settings.retention_days))
                logger.info(
                    "retention purge: %d usage records, %d conversations older than %s removed",
                    result.usage_records,
                    result.conversations,
                    result.cutoff.isoformat(),
                )
            except Exception:
                logger.warning("retention purge failed; next try in a day", exc_info=True)
            await asyncio.sleep(PURGE_INTERVAL_S)
