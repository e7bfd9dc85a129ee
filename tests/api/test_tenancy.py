"""Tenants and keys: a real server process (auth on, MariaDB, Redis) driven by the official `openai`
client and raw sockets; plus the loopback admin rule and the key cache's two tables.

- the response cache is scoped per key; a hit is accounted, rate limited and stored in its conversation
- the key is checked before the body is read; failed authentications are throttled per address
- per-key concurrency cap; conversation writes count against the key's limits
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
from openai import OpenAI

from deepseek_serve.api.access import client_address
from deepseek_serve.api.app import create_app
from deepseek_serve.engine.async_engine import AsyncEngine
from deepseek_serve.storage import Storage
from deepseek_serve.storage.key_lookup import KeyLookup, KeyStatus
from deepseek_serve.storage.keys import generate_secret
from tests.support.api import asgi_client
from tests.support.cache import delete_prefix, redis_url, unique_prefix
from tests.support.server import ServeProcess
from tests.support.settings import make_settings
from tests.support.storage import create_database, mariadb, mariadb_exec, storage_settings

ADMIN_KEY = generate_secret()
FAILURES_PER_MIN = 5
CONCURRENT_PER_KEY = 2


class Server(ServeProcess):
    database: str

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(
            method, f"{self.url}{path}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30, **kwargs
        )

    def new_key(self, **extra: Any) -> str:
        response = self.admin("POST", "/admin/keys", json={"name": f"k-{uuid.uuid4().hex[:6]}", **extra})
        assert response.status_code == 201, response.text
        return str(response.json()["key"])

    def client(self, key: str, **kwargs: Any) -> OpenAI:
        return self.openai_client(key, **kwargs)

    def sql(self, query: str) -> list[list[str]]:
        out = subprocess.run(
            [*mariadb().mysql_args(), "-N", "-B", self.database, "-e", query],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        return [line.split("\t") for line in out.splitlines()]


@pytest.fixture(scope="module")
def shared_env() -> Iterator[dict[str, str]]:
    """One database and one Redis key prefix, for the server and its twin."""
    redis = redis_url()
    database = asyncio.run(create_database())
    prefix = unique_prefix()
    try:
        yield {
            "DS_AUTH": "on",
            "DS_ADMIN_KEY": ADMIN_KEY,
            "DS_DB_AUTO_MIGRATE": "true",
            "DS_DATABASE_URL": mariadb().url(database),
            "DS_REDIS_URL": redis,
            "DS_REDIS_KEY_PREFIX": prefix,
            "DS_USAGE_FLUSH_INTERVAL_S": "0.1",
            "DS_AUTH_FAILURES_PER_MIN": str(FAILURES_PER_MIN),
            "DS_MAX_CONCURRENT_PER_KEY": str(CONCURRENT_PER_KEY),
            "DS_LOG_LEVEL": "info",
            "database": database,
        }
    finally:
        delete_prefix(redis, prefix)
        asyncio.run(mariadb_exec(f"DROP DATABASE IF EXISTS `{database}`"))


def _start(tmp_path_factory: pytest.TempPathFactory, name: str, shared_env: dict[str, str]) -> Server:
    env = {k: v for k, v in shared_env.items() if k.startswith("DS_")}
    proc = Server(tmp_path_factory.mktemp(name), ready_path="/health/live", timeout_s=180, **env)
    proc.database = shared_env["database"]
    return proc


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, shared_env: dict[str, str]) -> Iterator[Server]:
    with _start(tmp_path_factory, "tenancy", shared_env) as proc:
        yield proc


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory, shared_env: dict[str, str], server: Server) -> Iterator[Server]:
    """A second server process on the same database and Redis (a second worker or replica)."""
    with _start(tmp_path_factory, "tenancy-twin", shared_env) as proc:
        yield proc


def model_of(server: Server) -> str:
    return str(server.admin("GET", "/v1/models").json()["data"][0]["id"])


def ask(client: OpenAI, model: str, content: str, **extra: Any) -> tuple[dict[str, str], Any]:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0, **extra
    )
    return dict(raw.headers), raw.parse()


def usage_rows(server: Server, secret: str, expected: int) -> list[list[str]]:
    """The key's usage records (finish_reason, status, prompt, completion), once `expected` are written."""
    key_id = server.sql(f"SELECT id FROM api_keys WHERE key_hash = SHA2('{secret}', 256)")[0][0]
    deadline = time.monotonic() + 20
    while True:
        rows = server.sql(
            "SELECT finish_reason, status, prompt_tokens, completion_tokens FROM usage_records "
            f"WHERE key_id = {key_id} ORDER BY id"
        )
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def admitted_soon(client: OpenAI, model: str, within_s: float = 10.0) -> None:
    """A request is admitted within `within_s` (429s before that are retried every 0.2 s)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            ask(client, model, "Now there is room.")
            return
        except openai.RateLimitError:
            assert time.monotonic() < deadline, f"still refused after {within_s:.0f}s"
            time.sleep(0.2)


# --- tenant isolation ------------------------------------------------------------------------------
def test_one_keys_cached_answer_is_never_served_to_another(server: Server) -> None:
    model = model_of(server)
    a, b = server.client(server.new_key()), server.client(server.new_key())
    question = f"Say a color. {uuid.uuid4().hex[:6]}"
    headers, first = ask(a, model, question)
    assert headers["x-cache"] == "miss"
    headers, again = ask(a, model, question)
    assert headers["x-cache"] == "hit" and again.choices[0].message.content == first.choices[0].message.content
    headers, other = ask(b, model, question)
    assert headers["x-cache"] == "miss"  # B's own engine run, not A's answer
    assert other.usage is not None and other.usage.prompt_tokens_details.cached_tokens < other.usage.prompt_tokens
    headers, _ = ask(b, model, question)
    assert headers["x-cache"] == "hit"


def test_a_cache_hit_is_accounted_and_rate_limited_like_a_miss(server: Server) -> None:
    model = model_of(server)
    secret = server.new_key(rpm_limit=2)
    client = server.client(secret)
    question = f"Name a fruit. {uuid.uuid4().hex[:6]}"
    headers, miss = ask(client, model, question)
    assert headers["x-cache"] == "miss" and headers["x-ratelimit-remaining-requests"] in ("0", "1")
    headers, hit = ask(client, model, question)
    assert headers["x-cache"] == "hit" and "x-ratelimit-limit-requests" in headers
    with pytest.raises(openai.RateLimitError) as refused:
        ask(client, model, question)  # the third within a minute: refused although it is cached
    assert int(refused.value.response.headers["retry-after"]) >= 1
    rows = usage_rows(server, secret, 2)
    assert [r[:2] for r in rows] == [[miss.choices[0].finish_reason, "200"], ["cache_hit", "200"]]
    assert rows[1][2:] == [str(hit.usage.prompt_tokens), str(hit.usage.completion_tokens)]


def test_a_cache_hit_is_stored_in_its_conversation(server: Server) -> None:
    model = model_of(server)
    secret = server.new_key()
    client = server.client(secret)
    auth = {"Authorization": f"Bearer {secret}"}
    seed = {"messages": [{"role": "system", "content": f"You are terse. {uuid.uuid4().hex[:6]}"}]}
    conversations = [
        httpx.post(f"{server.url}/v1/conversations", json=seed, headers=auth, timeout=30).json()["id"] for _ in range(2)
    ]
    answers = []
    for conversation_id, expected in zip(conversations, ("miss", "hit"), strict=True):
        headers, answer = ask(client, model, "Say hello.", extra_body={"conversation_id": conversation_id})
        assert headers["x-cache"] == expected  # same history and question: the second is a hit
        answers.append(answer.choices[0].message.content)
    for conversation_id in conversations:
        messages = httpx.get(
            f"{server.url}/v1/conversations/{conversation_id}/messages", headers=auth, timeout=30
        ).json()["data"]
        assert [m["role"] for m in messages] == ["system", "user", "assistant"]
        assert messages[-1]["content"] == answers[0]
    # the next turn of the hit conversation sees the stored answer in its history
    _, follow = ask(client, model, "Again.", extra_body={"conversation_id": conversations[1]})
    _, alone = ask(client, model, "Again.")
    assert follow.usage.prompt_tokens > alone.usage.prompt_tokens


# --- auth before work ------------------------------------------------------------------------------
def raw_request(server: Server, head: str, forwarded_for: str, timeout_s: float = 5.0) -> tuple[int, str, float]:
    """Send only a request head (a body is announced but never sent); the status, the response and
    how long the answer took. The server must answer and close without waiting for the body."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout_s) as sock:
        started = time.monotonic()
        sock.sendall((head + f"X-Forwarded-For: {forwarded_for}\r\n\r\n").encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        elapsed = time.monotonic() - started
    text = data.decode("latin-1")
    return int(text.split()[1]), text, elapsed


def post_head(path: str, authorization: str | None) -> str:
    auth = f"Authorization: {authorization}\r\n" if authorization else ""
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}Content-Length: 1000000\r\n"


def test_the_key_is_checked_before_the_body_is_read(server: Server) -> None:
    address = "198.51.100.1"
    for authorization in (None, f"Bearer {generate_secret()}"):
        status, text, elapsed = raw_request(server, post_head("/v1/chat/completions", authorization), address)
        assert status == 401 and elapsed < 3, text  # answered without the 1 MB body ever arriving
        assert "connection: close" in text.lower() and '"type":"authentication_error"' in text
    inference_only = server.new_key()
    status, text, _ = raw_request(server, post_head("/admin/keys", f"Bearer {inference_only}"), address)
    assert status == 403 and '"code":"insufficient_scope"' in text


def test_failed_authentications_are_throttled_per_address_and_logged_without_the_key(server: Server) -> None:
    attacker, bystander = "203.0.113.7", "203.0.113.8"
    valid = server.new_key()
    tried = [generate_secret() for _ in range(FAILURES_PER_MIN)]
    for secret in tried:
        status, _, _ = raw_request(
            server,
            f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\nConnection: close\r\n",
            attacker,
        )
        assert status == 401
    head = f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {valid}\r\nConnection: close\r\n"
    status, text, _ = raw_request(server, head, attacker)
    assert status == 429 and '"code":"too_many_auth_failures"' in text, text  # even a valid key, from there
    retry_after = int(next(line.split(":")[1] for line in text.split("\r\n") if line.lower().startswith("retry-after")))
    assert 1 <= retry_after <= 60 // FAILURES_PER_MIN + 1
    status, _, _ = raw_request(server, head, bystander)
    assert status == 200  # another address is not affected
    forged = (
        f"GET /v1/models%0AFORGED-LINE HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tried[0]}\r\nConnection: close\r\n"
    )
    assert raw_request(server, forged, "203.0.113.9")[0] == 401
    log = server.stderr()
    assert "\\nFORGED-LINE" in log and not [line for line in log.splitlines() if line.startswith("FORGED-LINE")]
    assert log.count("authentication failed (invalid_api_key) from 203.0.113.7") == FAILURES_PER_MIN
    for secret in tried:
        assert secret not in log and secret[-4:] + " " not in log


def test_per_key_concurrency_cap(server: Server) -> None:
    model = model_of(server)
    secret = server.new_key()
    client = server.client(secret)
    streams = [
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Write a long story."}],
            max_tokens=400,
            temperature=0.7,
            stream=True,
        )
        for _ in range(CONCURRENT_PER_KEY)
    ]
    try:
        for stream in streams:
            next(iter(stream))  # both are running
        with pytest.raises(openai.RateLimitError) as refused:
            ask(client, model, "One more.")
        assert refused.value.code == "concurrency_limit_exceeded"
        assert int(refused.value.response.headers["retry-after"]) >= 1
        headers, _ = ask(server.client(server.new_key()), model, "Another key is not affected.")
        assert "x-cache" in headers
    finally:
        for stream in streams:
            stream.close()
    admitted_soon(client, model)  # the closed streams release their places once the server sees it


def test_two_processes_share_the_throttle_and_the_concurrency_cap(server: Server, twin: Server) -> None:
    address = "203.0.113.20"

    def models(secret: str) -> str:
        return f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\nConnection: close\r\n"

    for proc in (server, twin, server, twin, server):  # FAILURES_PER_MIN failures, spread over both
        assert raw_request(proc, models(generate_secret()), address)[0] == 401
    valid = server.new_key()
    for proc in (server, twin):
        status, text, _ = raw_request(proc, models(valid), address)
        assert status == 429 and '"code":"too_many_auth_failures"' in text, text

    model = model_of(server)
    streams = [
        server.client(valid).chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Write a long story."}],
            max_tokens=400,
            temperature=0.7,
            stream=True,
        )
        for _ in range(CONCURRENT_PER_KEY)
    ]
    try:
        for stream in streams:
            next(iter(stream))  # both are running, on the first process
        with pytest.raises(openai.RateLimitError) as refused:
            ask(twin.client(valid), model, "One more, on the other process.")
        assert refused.value.code == "concurrency_limit_exceeded"
    finally:
        for stream in streams:
            stream.close()
    admitted_soon(twin.client(valid), model)  # released once the first process has seen the disconnects


def test_conversation_writes_count_against_the_keys_limits(server: Server) -> None:
    secret = server.new_key(rpm_limit=2)
    auth = {"Authorization": f"Bearer {secret}"}
    created = httpx.post(f"{server.url}/v1/conversations", json={}, headers=auth, timeout=30)
    assert created.status_code == 200 and created.headers["x-ratelimit-limit-requests"] == "2"
    deleted = httpx.delete(f"{server.url}/v1/conversations/{created.json()['id']}", headers=auth, timeout=30)
    assert deleted.status_code == 200
    refused = httpx.post(f"{server.url}/v1/conversations", json={}, headers=auth, timeout=30)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"


# --- in process: DS_AUTH=auto on loopback, the key cache, the throttle's arithmetic ----------------
@pytest_asyncio.fixture(loop_scope="session")
async def loopback_app(engine: AsyncEngine, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(tmp_path, host="127.0.0.1", auth="auto", admin_key=ADMIN_KEY, redis_url="")
    app = create_app(settings, engine)
    async with asgi_client(app) as client:
        yield client


@pytest.mark.asyncio(loop_scope="session")
async def test_loopback_auto_auth_still_guards_the_admin_api(loopback_app: httpx.AsyncClient) -> None:
    assert (await loopback_app.get("/v1/models")).status_code == 200  # inference stays open on loopback
    refused = await loopback_app.get("/admin/keys")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "missing_api_key"
    created = await loopback_app.post("/admin/keys", json={"name": "x"})
    assert created.status_code == 401
    listed = await loopback_app.get("/admin/keys", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert listed.status_code == 200
    plain = (
        await loopback_app.post("/admin/keys", json={"name": "plain"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    ).json()["key"]
    denied = await loopback_app.get("/admin/keys", headers={"Authorization": f"Bearer {plain}"})
    assert denied.status_code == 403


class CountingKeyRepository:
    """The real repository, counting the lookups that reach the database."""

    def __init__(self, repo: Any) -> None:
        self.repo = repo
        self.lookups = 0

    async def find_by_hash(self, key_hash: str) -> Any:
        self.lookups += 1
        return await self.repo.find_by_hash(key_hash)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.repo, name)


@pytest.mark.asyncio(loop_scope="session")
async def test_unknown_keys_cannot_evict_valid_keys_from_the_cache(tmp_path: Path) -> None:
    storage = Storage(storage_settings(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'k.db'}", db_auto_migrate=True))
    await storage.start()
    try:
        valid = [(await storage.keys.create(f"k{i}")).secret for i in range(3)]
        repo = CountingKeyRepository(storage.keys)
        lookup = KeyLookup(repo, ttl_s=600, max_entries=3, max_unknown=50)  # type: ignore[arg-type]
        for secret in valid:
            assert (await lookup.check(secret)).status is KeyStatus.OK
        flood = [generate_secret() for _ in range(500)]
        for secret in flood:
            assert (await lookup.check(secret)).status is KeyStatus.INVALID
        assert lookup.cached_counts() == (3, 50)
        before = repo.lookups
        for secret in valid:
            assert (await lookup.check(secret)).status is KeyStatus.OK
        assert repo.lookups == before  # all three still answered from the cache
        await lookup.check(flood[-1])
        assert repo.lookups == before  # a recent unknown key is cached too (no query per retry)
    finally:
        await storage.close()


def test_client_address_groups_ipv6_by_64() -> None:
    assert client_address({"client": ("192.0.2.1", 1)}) == "192.0.2.1"
    assert client_address({"client": ("2001:db8::1", 1)}) == client_address({"client": ("2001:db8::ffff:1", 1)})
    assert client_address({"client": ("2001:db8::1", 1)}) != client_address({"client": ("2001:db8:0:1::1", 1)})
    assert client_address({"client": None}) == "unknown"


@pytest.mark.asyncio(loop_scope="session")
async def test_an_engine_behind_a_gateway_takes_the_shared_secret_not_api_keys(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    # DS_ROLE=engine on a public address: auth is "on" there, but the keys are checked by the gateway;
    # the engine has no key store, and its gate is the shared secret
    settings = make_settings(tmp_path, role="engine", host="0.0.0.0", engine_secret="s3cret-engine", redis_url="")
    assert settings.auth_enabled
    app = create_app(settings, engine)
    async with asgi_client(app) as client:
        assert (await client.get("/v1/models", headers={"Authorization": "Bearer s3cret-engine"})).status_code == 200
        refused = await client.get("/v1/models", headers={"Authorization": f"Bearer {generate_secret()}"})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_engine_secret"
