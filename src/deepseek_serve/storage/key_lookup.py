"""KeyLookup: verify a presented secret against the stored hashes, with a short in-process cache.

A hit costs one SHA-256 and a dict lookup; a miss one indexed SELECT. Entries live `ttl_s`, so a
revocation made elsewhere (CLI, another worker) takes effect within that time; `invalidate()`
makes a revocation in this process take effect at once. Expiry is checked on every call against
the cached `expires_at`, so it is exact. While the database is unreachable, entries past their TTL
are still served (a stale answer beats refusing every caller); a key never seen before raises
`KeyStoreUnavailable`. `last_used_at` is collected here and written by `flush_touches()` off the
request path, at most once per `touch_interval_s` per key.

Stored keys and unknown secrets are cached apart, each LRU-bounded: a flood of made-up keys only
pushes out other made-up keys, never a valid key's entry (which would send every request of that
key to the database).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from sqlalchemy.exc import DBAPIError, DisconnectionError

from deepseek_serve.storage.keys import KEY_PREFIX, KeyInfo, KeyRepository, hash_secret, hashes_match
from deepseek_serve.storage.models import utcnow


class KeyStoreUnavailable(RuntimeError):
    """The key could not be checked: the database is unreachable and the key is not cached."""


class KeyStatus(str, Enum):
    OK = "ok"
    INVALID = "invalid"
    EXPIRED = "expired"
    REVOKED = "revoked"


@dataclass(frozen=True)
class KeyCheck:
    status: KeyStatus
    key: KeyInfo | None = None


@dataclass
class _Entry:
    key: KeyInfo | None  # None = no such key (negative entry)
    stored_hash: str | None
    fetched_at: float  # time.monotonic()


class KeyLookup:
    def __init__(
        self,
        repo: KeyRepository,
        *,
        ttl_s: float = 30.0,
        touch_interval_s: float = 60.0,
        max_entries: int = 10_000,
        max_unknown: int = 10_000,
    ) -> None:
        self._repo = repo
        self._ttl_s = ttl_s
        self._touch_interval_s = touch_interval_s
        self._max_entries = max_entries
        self._max_unknown = max_unknown
        self._cache: OrderedDict[str, _Entry] = OrderedDict()  # key hash -> stored key, LRU order
        self._unknown: OrderedDict[str, _Entry] = OrderedDict()  # key hash -> negative entry, LRU order
        self._touched: dict[int, float] = {}  # key id -> monotonic time of the last queued touch
        self._pending_touch: dict[int, datetime] = {}

    async def check(self, secret: str) -> KeyCheck:
        """Classify a presented secret; raises KeyStoreUnavailable (see module docstring)."""
        if not secret.startswith(KEY_PREFIX) or len(secret) > 256:
            return KeyCheck(KeyStatus.INVALID)
        key_hash = hash_secret(secret)
        entry = self._cache.get(key_hash) or self._unknown.get(key_hash)
        now = time.monotonic()
        if entry is None or now - entry.fetched_at >= self._ttl_s:
            try:
                found = await self._repo.find_by_hash(key_hash)
            except (DBAPIError, DisconnectionError, OSError) as exc:
                if entry is None or entry.key is None:
                    raise KeyStoreUnavailable("the key store is unreachable") from exc
                entry.fetched_at = now - max(self._ttl_s - 1.0, 0.0)  # serve stale; retry in about 1 s
            else:
                entry = _Entry(found[0] if found else None, found[1] if found else None, now)
                self._remember(key_hash, entry)
        else:
            (self._cache if entry.key is not None else self._unknown).move_to_end(key_hash)
        assert entry is not None
        if entry.key is None or entry.stored_hash is None or not hashes_match(entry.stored_hash, secret):
            return KeyCheck(KeyStatus.INVALID)
        key = entry.key
        if key.is_revoked:
            return KeyCheck(KeyStatus.REVOKED, key)
        if key.is_expired():
            return KeyCheck(KeyStatus.EXPIRED, key)
        if now - self._touched.get(key.id, -1e18) >= self._touch_interval_s:
            self._touched[key.id] = now
            self._pending_touch[key.id] = utcnow()
        return KeyCheck(KeyStatus.OK, key)

    def _remember(self, key_hash: str, entry: _Entry) -> None:
        if entry.key is not None:
            table, other, bound = self._cache, self._unknown, self._max_entries
        else:
            table, other, bound = self._unknown, self._cache, self._max_unknown
        other.pop(key_hash, None)
        table[key_hash] = entry
        table.move_to_end(key_hash)
        while len(table) > bound:
            table.popitem(last=False)

    def cached_counts(self) -> tuple[int, int]:
        """(stored keys, unknown secrets) held in the cache."""
        return len(self._cache), len(self._unknown)

    def invalidate(self, key_id: int | None = None) -> None:
        """Forget cached entries: all of them, or those of one key (after a revoke in this process)."""
        if key_id is None:
            self._cache.clear()
            self._unknown.clear()
            return
        for h in [h for h, e in self._cache.items() if e.key is not None and e.key.id == key_id]:
            del self._cache[h]

    def pending_touches(self) -> int:
        return len(self._pending_touch)

    async def flush_touches(self) -> None:
        """Write queued `last_used_at` values; on failure they are kept for the next flush."""
        if not self._pending_touch:
            return
        batch, self._pending_touch = self._pending_touch, {}
        try:
            await self._repo.touch(batch)
        except Exception:
            for key_id, when in batch.items():
                self._pending_touch.setdefault(key_id, when)
            raise
