"""API keys: generation, hashing, and the repository behind `keys` CLI and /admin/keys.

A key is `sk-` + 48 url-safe random characters (288 bits). Only its SHA-256 is stored: a secret of
that entropy cannot be brute-forced, so a slow password hash (bcrypt) would only slow every
request down. `prefix` (the first 8 characters after `sk-`) is stored so humans can tell keys apart.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, select, update

from deepseek_serve.storage.db import SessionFactory
from deepseek_serve.storage.models import ALL_SCOPES, SCOPE_ADMIN, SCOPE_INFERENCE, ApiKey, utcnow

KEY_PREFIX = "sk-"
KEY_RANDOM_CHARS = 48
VISIBLE_PREFIX_CHARS = 8
BOOTSTRAP_KEY_NAME = "bootstrap-admin (DS_ADMIN_KEY)"


def generate_secret() -> str:
    """A new secret: `sk-` + 48 url-safe characters."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_CHARS * 3 // 4)


def hash_secret(secret: str) -> str:
    """Hex SHA-256 of the whole secret (64 characters)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def visible_prefix(secret: str) -> str:
    body = secret[len(KEY_PREFIX) :] if secret.startswith(KEY_PREFIX) else secret
    return body[:VISIBLE_PREFIX_CHARS]


def hashes_match(stored_hash: str, secret: str) -> bool:
    """Constant-time comparison of a stored hash with the hash of `secret`."""
    return hmac.compare_digest(stored_hash.encode("ascii"), hash_secret(secret).encode("ascii"))


@dataclass(frozen=True)
class KeyInfo:
    """A key as seen by callers of the repository (never holds the secret)."""

    id: int
    name: str
    prefix: str
    scopes: frozenset[str]
    rpm_limit: int | None
    tpm_limit: int | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    @classmethod
    def from_row(cls, row: ApiKey) -> KeyInfo:
        return cls(
            id=row.id,
            name=row.name,
            prefix=row.prefix,
            scopes=row.scope_set,
            rpm_limit=row.rpm_limit,
            tpm_limit=row.tpm_limit,
            created_at=row.created_at,
            expires_at=row.expires_at,
            revoked_at=row.revoked_at,
            last_used_at=row.last_used_at,
        )

    def is_expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or utcnow())

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def display_prefix(self) -> str:
        return f"{KEY_PREFIX}{self.prefix}..."

    def to_dict(self) -> dict[str, object]:
        """JSON-ready view (no secret, no hash); datetimes as ISO 8601 UTC."""

        def iso(value: datetime | None) -> str | None:
            return value.isoformat(timespec="seconds") + "Z" if value else None

        return {
            "id": str(self.id),
            "object": "api_key",
            "name": self.name,
            "prefix": self.display_prefix,
            "scopes": sorted(self.scopes),
            "rpm_limit": self.rpm_limit,
            "tpm_limit": self.tpm_limit,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "last_used_at": iso(self.last_used_at),
        }


@dataclass(frozen=True)
class CreatedKey:
    """A freshly created key: `secret` is shown once and never stored."""

    info: KeyInfo
    secret: str


def normalize_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """Validate scope names; raises ValueError naming the unknown ones."""
    out = frozenset(s.strip() for s in scopes if s.strip())
    unknown = sorted(out - set(ALL_SCOPES))
    if unknown:
        raise ValueError(f"unknown scope(s) {unknown}; valid scopes: {list(ALL_SCOPES)}")
    if not out:
        raise ValueError(f"at least one scope is required; valid scopes: {list(ALL_SCOPES)}")
    return out


def _by_hash(key_hash: str) -> Select[Any]:
    return select(ApiKey).where(ApiKey.key_hash == key_hash)


class KeyRepository:
    def __init__(self, sessions: SessionFactory) -> None:
        self._sessions = sessions

    async def create(
        self,
        name: str,
        *,
        admin: bool = False,
        scopes: Iterable[str] | None = None,
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
        expires_in: timedelta | None = None,
        secret: str | None = None,
    ) -> CreatedKey:
        """Insert a key; returns it with its secret (the only time the secret is available)."""
        scope_set = normalize_scopes(scopes) if scopes is not None else frozenset({SCOPE_INFERENCE})
        if admin:
            scope_set |= {SCOPE_ADMIN, SCOPE_INFERENCE}
        secret = secret or generate_secret()
        now = utcnow()
        row = ApiKey(
            name=name[:128],
            prefix=visible_prefix(secret),
            key_hash=hash_secret(secret),
            scopes=",".join(sorted(scope_set)),
            rpm_limit=rpm_limit,
            tpm_limit=tpm_limit,
            created_at=now,
            expires_at=now + expires_in if expires_in else None,
        )
        async with self._sessions() as session, session.begin():
            session.add(row)
        return CreatedKey(info=KeyInfo.from_row(row), secret=secret)

    async def get(self, key_id: int) -> KeyInfo | None:
        async with self._sessions() as session:
            row = await session.get(ApiKey, key_id)
            return KeyInfo.from_row(row) if row else None

    async def find_by_hash(self, key_hash: str) -> tuple[KeyInfo, str] | None:
        """(key, stored hash) for a hash, or None. The caller compares hashes in constant time."""
        async with self._sessions() as session:
            row: ApiKey | None = (await session.execute(_by_hash(key_hash))).scalar_one_or_none()
            return (KeyInfo.from_row(row), row.key_hash) if row else None

    async def list(self, *, include_revoked: bool = False) -> list[KeyInfo]:
        stmt = select(ApiKey).order_by(ApiKey.id)
        if not include_revoked:
            stmt = stmt.where(ApiKey.revoked_at.is_(None))
        async with self._sessions() as session:
            return [KeyInfo.from_row(r) for r in (await session.execute(stmt)).scalars()]

    async def revoke(self, key_id: int) -> KeyInfo | None:
        """Mark a key revoked (idempotent); None when no such key."""
        async with self._sessions() as session, session.begin():
            row = await session.get(ApiKey, key_id)
            if row is None:
                return None
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            return KeyInfo.from_row(row)

    async def touch(self, last_used: dict[int, datetime]) -> None:
        """Write `last_used_at` for several keys (one UPDATE per key, one transaction)."""
        if not last_used:
            return
        async with self._sessions() as session, session.begin():
            for key_id, when in last_used.items():
                await session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=when))

    async def ensure_bootstrap_admin(self, secret: str) -> KeyInfo:
        """Upsert the `DS_ADMIN_KEY` admin key (hashed) and revoke earlier bootstrap keys.

        A bootstrap key revoked by an admin stays revoked: rotate by setting a new `DS_ADMIN_KEY`.
        """
        key_hash = hash_secret(secret)
        async with self._sessions() as session, session.begin():
            row = (await session.execute(_by_hash(key_hash))).scalar_one_or_none()
            now = utcnow()
            await session.execute(
                update(ApiKey)
                .where(ApiKey.name == BOOTSTRAP_KEY_NAME, ApiKey.key_hash != key_hash, ApiKey.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            if row is None:
                row = ApiKey(
                    name=BOOTSTRAP_KEY_NAME,
                    prefix=visible_prefix(secret),
                    key_hash=key_hash,
                    scopes=",".join(sorted(ALL_SCOPES)),
                    created_at=now,
                )
                session.add(row)
                await session.flush()
            return KeyInfo.from_row(row)
