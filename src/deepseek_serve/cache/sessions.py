"""Short-lived web sessions: session id -> (conversation, API key), with a sliding TTL.

A session expires `ttl_s` after its last `get`. In Redis each session is a hash
`{prefix}sess:<id>`; in process, a dict. While Redis is unavailable new sessions are kept in
process and `get` looks in both, so a page keeps working through an outage (sessions created
during it are local to this process until they expire).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from deepseek_serve.cache.client import RedisClient, RedisUnavailable
from deepseek_serve.contracts import Principal

if TYPE_CHECKING:
    from deepseek_serve.config import Settings

SESSION_ID_BYTES = 24


def new_session_id() -> str:
    return "sess_" + secrets.token_urlsafe(SESSION_ID_BYTES)


def _record(session_id: str, principal: Principal, conversation_id: str, created_at: float) -> dict[str, Any]:
    return {
        "session_id": session_id,
        "conversation_id": conversation_id,
        "key_id": principal.key_id,
        "name": principal.name,
        "created_at": created_at,
    }


class LocalSessionStore:
    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._sessions: dict[str, tuple[float, dict[str, Any]]] = {}

    async def create(self, principal: Principal, conversation_id: str) -> str:
        self._prune()
        session_id = new_session_id()
        self._sessions[session_id] = (
            self._clock() + self.ttl_s,
            _record(session_id, principal, conversation_id, time.time()),
        )
        return session_id

    async def get(self, session_id: str) -> dict[str, Any] | None:
        entry = self._sessions.get(session_id)
        if entry is None:
            return None
        if self._clock() >= entry[0]:
            del self._sessions[session_id]
            return None
        self._sessions[session_id] = (self._clock() + self.ttl_s, entry[1])
        return dict(entry[1])

    async def delete(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def _prune(self) -> None:
        now = self._clock()
        for session_id in [s for s, (exp, _) in self._sessions.items() if now >= exp]:
            del self._sessions[session_id]


class RedisSessionStore:
    """Sessions in Redis hashes; raises RedisUnavailable (FailoverSessionStore handles it)."""

    def __init__(self, client: RedisClient, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s

    def _key(self, session_id: str) -> str:
        return self.client.key("sess", session_id)

    async def create(self, principal: Principal, conversation_id: str) -> str:
        session_id = new_session_id()
        record = _record(session_id, principal, conversation_id, time.time())
        mapping = {k: "" if v is None else str(v) for k, v in record.items()}
        name = self._key(session_id)

        async def op(r: Any) -> Any:
            async with r.pipeline(transaction=True) as pipe:
                pipe.hset(name, mapping=mapping)
                pipe.expire(name, self.ttl_s)
                return await pipe.execute()

        await self.client.run(op)
        return session_id

    async def get(self, session_id: str) -> dict[str, Any] | None:
        name = self._key(session_id)

        async def op(r: Any) -> Any:
            async with r.pipeline(transaction=True) as pipe:
                pipe.hgetall(name)
                pipe.expire(name, self.ttl_s)
                return await pipe.execute()

        raw, _ = await self.client.run(op)
        if not raw:
            return None
        data = {k.decode(): v.decode() for k, v in raw.items()}
        return {
            "session_id": data.get("session_id", session_id),
            "conversation_id": data.get("conversation_id", ""),
            "key_id": data.get("key_id") or None,
            "name": data.get("name", ""),
            "created_at": float(data.get("created_at") or 0.0),
        }

    async def delete(self, session_id: str) -> None:
        name = self._key(session_id)
        await self.client.run(lambda r: r.delete(name))


class FailoverSessionStore:
    def __init__(self, primary: RedisSessionStore, fallback: LocalSessionStore) -> None:
        self.primary = primary
        self.fallback = fallback

    async def create(self, principal: Principal, conversation_id: str) -> str:
        try:
            return await self.primary.create(principal, conversation_id)
        except RedisUnavailable:
            return await self.fallback.create(principal, conversation_id)

    async def get(self, session_id: str) -> dict[str, Any] | None:
        local = await self.fallback.get(session_id)
        if local is not None:
            return local
        try:
            return await self.primary.get(session_id)
        except RedisUnavailable:
            return None

    async def delete(self, session_id: str) -> None:
        await self.fallback.delete(session_id)
        try:
            await self.primary.delete(session_id)
        except RedisUnavailable:
            pass


def build_session_store(settings: Settings, client: RedisClient | None) -> LocalSessionStore | FailoverSessionStore:
    local = LocalSessionStore(settings.session_ttl_s)
    if client is None:
        return local
    return FailoverSessionStore(RedisSessionStore(client, settings.session_ttl_s), local)
