"""/v1/conversations in OpenAI's Conversations API shape, driven by the official `openai` SDK
(`client.conversations.*`, `client.conversations.items.*`) against a real server process (auth on,
MariaDB): the lifecycle, our fields kept as extensions, bounds, explicit nulls, key scoping, and
tool calls of a chat turn stored as function_call / function_call_output items that the next turn
renders back through the chat template exactly as the same history sent in full."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai import OpenAI

from deepseek_serve.storage.keys import generate_secret
from tests.support.server import ServeProcess
from tests.support.storage import create_database, mariadb, mariadb_exec

ADMIN_KEY = generate_secret()
MAX_ITEMS = 30  # DS_MAX_MESSAGES: also the most items a conversation holds
MODEL = "SmolLM2-135M-Instruct"
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
FORCE_WEATHER: Any = {"type": "function", "function": {"name": "get_weather"}}


class Server(ServeProcess):
    def new_key(self) -> str:
        response = httpx.post(
            f"{self.url}/admin/keys",
            json={"name": f"k-{uuid.uuid4().hex[:6]}"},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            timeout=30,
        )
        assert response.status_code == 201, response.text
        return str(response.json()["key"])

    def post(self, key: str, path: str, body: Any) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    database = asyncio.run(create_database())
    try:
        with Server(
            tmp_path_factory.mktemp("conversations"),
            timeout_s=180,
            DS_AUTH="on",
            DS_ADMIN_KEY=ADMIN_KEY,
            DS_DB_AUTO_MIGRATE="true",
            DS_DATABASE_URL=mariadb().url(database),
            DS_RESPONSE_CACHE="false",
            DS_MAX_MESSAGES=str(MAX_ITEMS),
        ) as proc:
            yield proc
    finally:
        asyncio.run(mariadb_exec(f"DROP DATABASE IF EXISTS `{database}`"))


@pytest.fixture(scope="module")
def alice(server: Server) -> OpenAI:
    return server.openai_client(server.new_key())


def test_sdk_conversation_lifecycle(server: Server, alice: OpenAI) -> None:
    conv = alice.conversations.create(
        metadata={"topic": "demo", "user": "alice"},
        items=[
            {"type": "message", "role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
        ],
    )
    assert conv.object == "conversation" and conv.id.startswith("conv_")
    assert conv.metadata == {"topic": "demo", "user": "alice"} and conv.created_at > 1_700_000_000
    extra = conv.model_extra or {}
    assert extra["message_count"] == 2 and extra["title"] is None  # our fields, as extensions

    got = alice.conversations.retrieve(conv.id)
    assert got.id == conv.id and got.metadata == conv.metadata and got.created_at == conv.created_at
    updated = alice.conversations.update(conv.id, metadata={"topic": "changed"})
    assert updated.metadata == {"topic": "changed"}
    assert alice.conversations.retrieve(conv.id).metadata == {"topic": "changed"}

    added = alice.conversations.items.create(
        conv.id,
        items=[
            {"type": "function_call", "call_id": "call_a", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
            {"type": "function_call_output", "call_id": "call_a", "output": "-3 and snowing"},
            {"type": "message", "role": "assistant", "content": "It is -3 in Oslo."},
        ],
    )
    assert [i.type for i in added.data] == ["function_call", "function_call_output", "message"]
    assert added.first_id == added.data[0].id and added.last_id == added.data[-1].id and not added.has_more

    # newest first by default; `after` pages on
    page = alice.conversations.items.list(conv.id, limit=2)
    assert [i.type for i in page.data] == ["message", "function_call_output"] and page.has_more
    assert page.data[0].role == "assistant"  # type: ignore[union-attr]
    assert page.data[0].content[0].type == "output_text"  # type: ignore[union-attr]
    everything = list(alice.conversations.items.list(conv.id, limit=2, order="asc"))  # the SDK follows pages
    assert [i.type for i in everything] == ["message", "message", "function_call", "function_call_output", "message"]
    first = everything[1]
    assert first.type == "message" and first.role == "user" and first.content[0].type == "input_text"
    assert first.content[0].text == "Hello"  # type: ignore[union-attr]
    call = everything[2]
    assert call.type == "function_call" and call.call_id == "call_a" and json.loads(call.arguments) == {"city": "Oslo"}

    fetched = alice.conversations.items.retrieve(call.id, conversation_id=conv.id)
    assert fetched.type == "function_call" and fetched.name == "get_weather"  # type: ignore[union-attr]
    after_delete = alice.conversations.items.delete(call.id, conversation_id=conv.id)
    assert after_delete.id == conv.id and (after_delete.model_extra or {})["message_count"] == 4
    with pytest.raises(openai.NotFoundError):
        alice.conversations.items.retrieve(call.id, conversation_id=conv.id)
    # the item ids of one type are not another type's
    with pytest.raises(openai.NotFoundError):
        alice.conversations.items.retrieve(call.id.replace("fc_", "msg_"), conversation_id=conv.id)

    deleted = alice.conversations.delete(conv.id)
    assert deleted.deleted and deleted.id == conv.id
    with pytest.raises(openai.NotFoundError):
        alice.conversations.retrieve(conv.id)


def test_another_key_sees_404_everywhere(server: Server, alice: OpenAI) -> None:
    conv = alice.conversations.create(items=[{"role": "user", "content": "mine"}])
    item = alice.conversations.items.list(conv.id).data[0]
    bob = server.openai_client(server.new_key())
    calls = [
        lambda: bob.conversations.retrieve(conv.id),
        lambda: bob.conversations.update(conv.id, metadata={"x": "y"}),
        lambda: bob.conversations.items.list(conv.id),
        lambda: bob.conversations.items.create(conv.id, items=[{"role": "user", "content": "theirs"}]),
        lambda: bob.conversations.items.retrieve(item.id, conversation_id=conv.id),
        lambda: bob.conversations.items.delete(item.id, conversation_id=conv.id),
        lambda: bob.conversations.delete(conv.id),
        lambda: bob.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=1,
            extra_body={"conversation_id": conv.id},
        ),
    ]
    for call in calls:
        with pytest.raises(openai.NotFoundError):
            call()
    # untouched by all of that
    assert alice.conversations.retrieve(conv.id).metadata == {}
    assert [i.id for i in alice.conversations.items.list(conv.id).data] == [item.id]


def test_bounds_and_nulls(server: Server, alice: OpenAI) -> None:
    key = alice.api_key
    too_many = {f"k{i}": "v" for i in range(17)}
    for bad in (
        {"metadata": too_many},
        {"metadata": {"k" * 65: "v"}},
        {"metadata": {"k": "v" * 513}},
        {"metadata": {"k": 1}},
        {"items": [{"role": "user", "content": "x"}] * 21},
        {"items": [{"type": "reasoning", "summary": []}]},
        {"items": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
        {"items": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]},
        {"items": [{"type": "function_call", "call_id": "c", "name": "bad name", "arguments": "{}"}]},
        {"titel": "typo"},
    ):
        response = server.post(key, "/v1/conversations", bad)
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"
    # at the bounds, and explicit nulls as "not set"
    edge = {f"{i:0>64}": "v" * 512 for i in range(16)}
    assert server.post(key, "/v1/conversations", {"metadata": edge}).status_code == 200
    nulls = server.post(key, "/v1/conversations", {"metadata": None, "items": None, "title": None, "messages": None})
    assert nulls.status_code == 200, nulls.text
    conv = nulls.json()
    assert conv["metadata"] == {} and conv["message_count"] == 0
    assert alice.conversations.update(conv["id"], metadata=None).metadata == {}
    empty = server.post(key, f"/v1/conversations/{conv['id']}", {})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "metadata"
    assert server.post(key, f"/v1/conversations/{conv['id']}/items", {"items": []}).status_code == 400
    with pytest.raises(openai.BadRequestError):
        alice.conversations.items.list(conv["id"], after="not-an-item")
    with pytest.raises(openai.NotFoundError):
        alice.conversations.items.retrieve("msg_x", conversation_id=conv["id"])
    # a conversation holds at most DS_MAX_MESSAGES items
    user = {"role": "user", "content": "x"}
    full = alice.conversations.create(items=[user] * 20)
    alice.conversations.items.create(full.id, items=[user] * (MAX_ITEMS - 20))
    with pytest.raises(openai.BadRequestError) as refused:
        alice.conversations.items.create(full.id, items=[user])
    assert refused.value.param == "items"  # type: ignore[attr-defined]
    assert (alice.conversations.retrieve(full.id).model_extra or {})["message_count"] == MAX_ITEMS


def _chat(client: OpenAI, conversation: str | None, messages: list[Any], **extra: Any) -> Any:
    body = {"conversation_id": conversation} if conversation else {}
    options = {"max_tokens": 60, "temperature": 0, **extra}
    return client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], extra_body=body, **options)


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_are_stored_structured_and_rendered_back(server: Server, alice: OpenAI, stream: bool) -> None:
    conv = alice.conversations.create(metadata={"case": "tools"})
    question = {"role": "user", "content": "What is the weather in Paris?"}
    if stream:
        chunks = list(_chat(alice, conv.id, [question], tool_choice=FORCE_WEATHER, stream=True))
        deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        call_id, name = deltas[0][0].id, deltas[0][0].function.name
        arguments = "".join(d[0].function.arguments or "" for d in deltas)
    else:
        first = _chat(alice, conv.id, [question], tool_choice=FORCE_WEATHER)
        (call,) = first.choices[0].message.tool_calls
        call_id, name, arguments = call.id, call.function.name, call.function.arguments
    assert name == "get_weather"
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])

    # stored as a user message and a function_call item with the answer's own call id, not as markup
    items = alice.conversations.items.list(conv.id, order="asc").data
    assert [i.type for i in items] == ["message", "function_call"], items
    stored = items[1]
    assert stored.call_id == call_id and stored.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(stored.arguments) == json.loads(arguments)  # type: ignore[union-attr]
    assert "<tool_call>" not in json.dumps([i.model_dump() for i in items])

    # the next turn sends only the tool result; the stored call is rendered back through the template
    result = {"role": "tool", "tool_call_id": call_id, "content": "21 degrees and sunny"}
    second = _chat(alice, conv.id, [result], tool_choice="none", max_tokens=4)
    full_history = [
        question,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}],
        },
        result,
    ]
    stateless = _chat(alice, None, full_history, tool_choice="none", max_tokens=4)
    assert second.usage.prompt_tokens == stateless.usage.prompt_tokens
    bare = _chat(alice, None, [question], tool_choice="none", max_tokens=1)
    assert second.usage.prompt_tokens > bare.usage.prompt_tokens + 15  # the call and its result are in the prompt

    items = alice.conversations.items.list(conv.id, order="asc").data
    assert [i.type for i in items] == ["message", "function_call", "function_call_output", "message"]
    assert items[2].call_id == call_id and items[2].output == "21 degrees and sunny"  # type: ignore[union-attr]
    assert items[3].role == "assistant"  # type: ignore[union-attr]
    # our chat-shaped listing shows the same call as tool_calls
    messages = httpx.get(
        f"{server.url}/v1/conversations/{conv.id}/messages",
        headers={"Authorization": f"Bearer {alice.api_key}"},
        timeout=30,
    ).json()["data"]
    assert messages[1]["tool_calls"][0]["id"] == call_id and messages[2]["tool_call_id"] == call_id


def test_tool_history_seeded_through_items_is_rendered_like_messages(server: Server, alice: OpenAI) -> None:
    """A history given as items (function_call + function_call_output) renders as the same history
    sent as chat messages."""
    arguments = '{"city": "Oslo", "unit": "celsius"}'
    conv = alice.conversations.create(
        items=[
            {"role": "user", "content": "Weather in Oslo?"},
            {"type": "function_call", "call_id": "call_x", "name": "get_weather", "arguments": arguments},
            {"type": "function_call_output", "call_id": "call_x", "output": "-3"},
        ]
    )
    follow = {"role": "user", "content": "And tomorrow?"}
    seeded = _chat(alice, conv.id, [follow], tool_choice="none", max_tokens=2)
    sent = _chat(
        alice,
        None,
        [
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_x", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
                ],
            },
            {"role": "tool", "tool_call_id": "call_x", "content": "-3"},
            follow,
        ],
        tool_choice="none",
        max_tokens=2,
    )
    assert seeded.usage.prompt_tokens == sent.usage.prompt_tokens
