"""Persistence through the HTTP API with the real model: auth (401/403 in OpenAI's shape), the admin
API, usage accounting, and conversations with their ownership; on MariaDB and SQLite."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import text

from deepseek_serve.api.app import create_app
from deepseek_serve.engine.async_engine import AsyncEngine
from deepseek_serve.storage import Storage
from deepseek_serve.storage.keys import generate_secret
from tests.support.api import asgi_client
from tests.support.settings import make_settings
from tests.support.storage import BACKENDS, database_url

ADMIN_KEY = generate_secret()
MODEL: dict[str, str] = {}  # the served model id, set by the `api` fixture


@pytest_asyncio.fixture(loop_scope="session", scope="module", params=BACKENDS)
async def api(
    request: pytest.FixtureRequest, engine: AsyncEngine, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[httpx.AsyncClient, Storage]]:
    """The real app (real engine) with auth on and its own database of the given backend."""
    tmp = tmp_path_factory.mktemp(f"api-{request.param}")
    async with database_url(request.param, tmp) as url:
        settings = make_settings(
            tmp,
            database_url=url,
            auth="on",
            admin_key=ADMIN_KEY,
            db_auto_migrate=True,
            usage_flush_interval_s=0.05,
            redis_url="",
            response_cache=False,
        )
        app = create_app(settings, engine)
        MODEL["id"] = engine.model_info.id
        async with asgi_client(app) as client:
            yield client, app.state.services.extras["storage"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


ADMIN = bearer(ADMIN_KEY)


def assert_error(response: httpx.Response, status: int, type_: str, code: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_ and body["error"]["code"] == code
    assert body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]


async def new_key(client: httpx.AsyncClient, name: str, **extra: Any) -> dict[str, Any]:
    response = await client.post("/admin/keys", json={"name": name, **extra}, headers=ADMIN)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def chat(client: httpx.AsyncClient, key: str, content: str, **extra: Any) -> httpx.Response:
    return await client.post(
        "/v1/chat/completions",
        headers=bearer(key),
        json={
            "model": MODEL["id"],
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 1,
            "temperature": 0,
            **extra,
        },
    )


async def test_health_is_open_and_v1_needs_a_key(api: tuple[httpx.AsyncClient, Storage]) -> None:
    client, _ = api
    assert (await client.get("/health")).status_code == 200
    assert_error(await client.get("/v1/models"), 401, "authentication_error", "missing_api_key")
    assert_error(
        await client.get("/v1/models", headers={"Authorization": "Basic abc"}),
        401,
        "authentication_error",
        "missing_api_key",
    )
    wrong = generate_secret()
    err = assert_error(
        await client.get("/v1/models", headers=bearer(wrong)), 401, "authentication_error", "invalid_api_key"
    )
    assert wrong not in err["message"]  # echoed masked, never whole
    assert_error(await client.post("/v1/chat/completions", json={}), 401, "authentication_error", "missing_api_key")
    assert_error(await client.get("/admin/keys"), 401, "authentication_error", "missing_api_key")
    assert_error(await client.get("/v1/conversations"), 401, "authentication_error", "missing_api_key")
    assert (await client.get("/v1/models", headers=ADMIN)).status_code == 200


async def test_inference_key_gets_403_on_admin_routes(api: tuple[httpx.AsyncClient, Storage]) -> None:
    client, _ = api
    key = (await new_key(client, "user"))["key"]
    assert (await client.get("/v1/models", headers=bearer(key))).status_code == 200
    for method, path in (
        ("GET", "/admin/keys"),
        ("POST", "/admin/keys"),
        ("DELETE", "/admin/keys/1"),
        ("GET", "/admin/usage"),
    ):
        response = await client.request(method, path, headers=bearer(key), json={"name": "x"})
        assert_error(response, 403, "permission_error", "insufficient_scope")


async def test_admin_keys_create_list_revoke(api: tuple[httpx.AsyncClient, Storage]) -> None:
    client, _ = api
    created = await new_key(client, "limited", rpm_limit=10, tpm_limit=500, expires_in="30d")
    assert created["key"].startswith("sk-") and created["prefix"] == f"sk-{created['key'][3:11]}..."
    assert created["rpm_limit"] == 10 and created["scopes"] == ["inference"] and created["expires_at"]
    listed = (await client.get("/admin/keys", headers=ADMIN)).json()["data"]
    mine = next(k for k in listed if k["id"] == created["id"])
    assert "key" not in mine and created["key"] not in str(listed)
    # revoke: refused at once in this process (the lookup cache is invalidated)
    assert (await client.get("/v1/models", headers=bearer(created["key"]))).status_code == 200
    revoked = await client.delete(f"/admin/keys/{created['id']}", headers=ADMIN)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    assert_error(
        await client.get("/v1/models", headers=bearer(created["key"])), 401, "authentication_error", "revoked_api_key"
    )
    still_listed = (await client.get("/admin/keys", headers=ADMIN)).json()["data"]
    assert created["id"] not in {k["id"] for k in still_listed}
    assert_error(
        await client.delete("/admin/keys/999999", headers=ADMIN), 404, "invalid_request_error", "key_not_found"
    )
    assert_error(await client.delete("/admin/keys/abc", headers=ADMIN), 400, "invalid_request_error", "invalid_value")


async def test_admin_rejects_bad_input_in_openai_shape(api: tuple[httpx.AsyncClient, Storage]) -> None:
    client, _ = api
    for body, param in (
        ({"name": "x", "scopes": ["root"]}, "scopes"),
        ({"name": "x", "expires_in": "soon"}, "expires_in"),
        ({"name": ""}, "name"),
        ({"name": "x", "rpm_limit": -1}, "rpm_limit"),
    ):
        err = assert_error(
            await client.post("/admin/keys", json=body, headers=ADMIN), 400, "invalid_request_error", "invalid_value"
        )
        assert err["param"] == param
    err = assert_error(
        await client.get("/admin/usage?group_by=colour", headers=ADMIN), 400, "invalid_request_error", "invalid_value"
    )
    assert err["param"] == "group_by"
    assert_error(
        await client.get("/admin/usage?since=yesterday", headers=ADMIN), 400, "invalid_request_error", "invalid_value"
    )


async def test_expired_key_is_refused(api: tuple[httpx.AsyncClient, Storage]) -> None:
    client, storage = api
    created = await new_key(client, "brief", expires_in="1h")
    async with storage.engine.begin() as conn:
        await conn.execute(
            text("UPDATE api_keys SET expires_at = '2000-01-01 00:00:00' WHERE id = :i"), {"i": int(created["id"])}
        )
    storage.key_lookup.invalidate()
    assert_error(
        await client.get("/v1/models", headers=bearer(created["key"])), 401, "authentication_error", "expired_api_key"
    )


async def test_usage_is_recorded_per_key_and_summarised(api: tuple[httpx.AsyncClient, Storage]) -> None:
    client, storage = api
    key = await new_key(client, "metered")
    answers = [await chat(client, key["key"], f"Say {word}.") for word in ("yes", "no", "maybe")]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    usage = [a.json()["usage"] for a in answers]
    deadline = time.monotonic() + 20
    while True:
        summary = await client.get(f"/admin/usage?group_by=day,model&key_id={key['id']}", headers=ADMIN)
        rows = summary.json()["data"]
        if rows and rows[0]["requests"] == 3:
            break
        assert time.monotonic() < deadline, rows
        await asyncio.sleep(0.1)
    (row,) = rows
    assert row["day"] == time.strftime("%Y-%m-%d", time.gmtime())
    assert row["model"] == answers[0].json()["model"]
    assert row["prompt_tokens"] == sum(u["prompt_tokens"] for u in usage)
    assert row["completion_tokens"] == sum(u["completion_tokens"] for u in usage) == 3
    async with storage.engine.connect() as conn:
        ids = set(
            (
                await conn.execute(
                    text("SELECT request_id FROM usage_records WHERE key_id = :k"), {"k": int(key["id"])}
                )
            ).scalars()
        )
        texts = (await conn.execute(text("SELECT COUNT(*) FROM usage_records WHERE prompt_text IS NOT NULL"))).scalar()
    assert ids == {a.json()["id"] for a in answers}
    assert texts == 0  # no content stored unless DS_STORE_CONTENT=true


async def test_conversations_through_chat_and_ownership(api: tuple[httpx.AsyncClient, Storage]) -> None:
    client, _ = api
    alice, bob = (await new_key(client, "alice"))["key"], (await new_key(client, "bob"))["key"]
    created = await client.post(
        "/v1/conversations",
        headers=bearer(alice),
        json={"messages": [{"role": "system", "content": "Answer briefly."}]},
    )
    assert created.status_code == 200, created.text
    conv = created.json()["id"]
    first = await chat(client, alice, "My name is 小明. Remember it.", conversation_id=conv)
    assert first.status_code == 200, first.text
    second = await chat(client, alice, "What is my name?", conversation_id=conv)
    assert second.status_code == 200
    # the second turn was given the stored history as context
    assert second.json()["usage"]["prompt_tokens"] > first.json()["usage"]["prompt_tokens"] + 5
    messages = (await client.get(f"/v1/conversations/{conv}/messages", headers=bearer(alice))).json()["data"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[1]["content"] == "My name is 小明. Remember it."
    assert messages[2]["content"] == first.json()["choices"][0]["message"]["content"]
    assert messages[4]["usage"]["completion_tokens"] == 1
    listed = (await client.get("/v1/conversations", headers=bearer(alice))).json()["data"]
    assert [c["id"] for c in listed] == [conv] and listed[0]["title"].startswith("My name is")
    # another key: the conversation does not exist for it
    assert (await client.get("/v1/conversations", headers=bearer(bob))).json()["data"] == []
    for method, path in (
        ("GET", f"/v1/conversations/{conv}"),
        ("GET", f"/v1/conversations/{conv}/messages"),
        ("DELETE", f"/v1/conversations/{conv}"),
    ):
        assert_error(
            await client.request(method, path, headers=bearer(bob)),
            404,
            "invalid_request_error",
            "conversation_not_found",
        )
    assert_error(
        await chat(client, bob, "hi", conversation_id=conv), 404, "invalid_request_error", "conversation_not_found"
    )
    assert_error(
        await client.post("/v1/conversations", headers=bearer(alice), json={"titel": "typo"}),
        400,
        "invalid_request_error",
        "invalid_value",
    )
    deleted = await client.delete(f"/v1/conversations/{conv}", headers=bearer(alice))
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert_error(
        await client.get(f"/v1/conversations/{conv}/messages", headers=bearer(alice)),
        404,
        "invalid_request_error",
        "conversation_not_found",
    )


async def test_conversation_writes_count_against_the_key_rate_limit(api: tuple[httpx.AsyncClient, Storage]) -> None:
    """Creating conversations goes through the key's rate limit like a completion: past `rpm_limit`
    the write is refused with the same 429 (OpenAI error shape, Retry-After, x-ratelimit-* headers)."""
    client, _ = api
    key = (await new_key(client, "two-per-minute", rpm_limit=2))["key"]
    statuses = []
    for _ in range(3):
        response = await client.post("/v1/conversations", headers=bearer(key), json={})
        statuses.append(response.status_code)
    assert statuses == [200, 200, 429]
    error = assert_error(response, 429, "rate_limit_error", "rate_limit_exceeded")
    assert error["message"].startswith("Rate limit reached")
    assert int(response.headers["Retry-After"]) >= 1
    assert response.headers["x-ratelimit-limit-requests"] == "2"
