"""Hostile input against a real `deepseek-serve serve` process: every public route gets ids out of range,
lone surrogates, NUL, huge numbers, wrong types, deep nesting and huge arrays, field by field. No answer is
a 5xx, every refusal is OpenAI's error shape, a stream running meanwhile finishes normally, and afterwards
the process is alive, ready and serves a normal chat through the official client."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from deepseek_serve.storage.keys import generate_secret
from tests.support.server import ServeProcess

ADMIN_KEY = generate_secret()

# raw JSON fragments put in place of one field's value (raw, because a lone surrogate, NaN or a
# 10**30 integer cannot go through a JSON encoder)
HOSTILE: list[str] = [
    "-1",
    "0",
    "9223372036854775808",  # 2**63
    "1" + "0" * 30,
    "-1e999",
    "NaN",
    "1e308",
    "true",
    "null",
    '"\\ud800"',
    '"a\\u0000b"',
    '"' + "x" * 200_000 + '"',
    "[]",
    "{}",
    "[-1]",
    "[[1, 2, -1]]",
    '{"-1": 1, "\\udfff": 2}',
    "[" + ",".join(["4294967296"] * 50_000) + "]",
    "[" * 3000 + "]" * 3000,
    '{"a": ' * 3000 + "1" + "}" * 3000,
]

CHAT_FIELDS = [
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
    "stream",
    "stream_options",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "logprobs",
    "top_logprobs",
    "conversation_id",
    "cache",
]
COMPLETION_FIELDS = [
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "logit_bias",
    "stream",
    "top_k",
    "min_p",
    "logprobs",
    "echo",
    "suffix",
    "best_of",
    "min_tokens",
]
MESSAGE_FIELDS = ["role", "content", "name"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with ServeProcess(
        tmp_path_factory.mktemp("hostile"),
        DS_AUTH="on",
        DS_ADMIN_KEY=ADMIN_KEY,
        DS_LOG_LEVEL="warning",
        DS_MAX_QUEUE_SIZE="16",
    ) as srv:
        yield srv


def _body(base: dict[str, Any], path: tuple[str | int, ...], fragment: str) -> bytes:
    """`base` as JSON with the value at `path` replaced by the raw `fragment`."""
    marker = "\x01HOSTILE\x01"
    doc = orjson.loads(orjson.dumps(base))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = marker
    return orjson.dumps(doc).replace(orjson.dumps(marker), fragment.encode())


def _check(resp: httpx.Response, what: str) -> None:
    assert resp.status_code < 500, f"{what}: {resp.status_code} {resp.text[:300]}"
    if resp.status_code >= 400:
        body = resp.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, what
        assert "Traceback" not in resp.text, what


class _Stream(threading.Thread):
    """A normal streamed chat that runs while the hostile requests go in."""

    def __init__(self, srv: ServeProcess, key: str, model: str) -> None:
        super().__init__(daemon=True)
        self.client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0, timeout=300)
        self.model = model
        self.finish: list[str | None] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for _ in range(3):
                stream = self.client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": "Tell me a story."}],
                    max_tokens=48,
                    temperature=0.7,
                    seed=1,
                    stream=True,
                    extra_body={"ignore_eos": True, "cache": False},
                )
                finish = None
                for chunk in stream:
                    for choice in chunk.choices:
                        finish = choice.finish_reason or finish
                self.finish.append(finish)
        except BaseException as exc:  # reported by the test
            self.error = exc


def test_hostile_values_on_every_route(server: ServeProcess, tmp_path: Path) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=server.url, timeout=120) as http:
        created = http.post("/admin/keys", json={"name": "user"}, headers=admin)
        assert created.status_code == 201, created.text
        user_key = created.json()["key"]
        user = {"Authorization": f"Bearer {user_key}", "content-type": "application/json"}
        jadmin = {**admin, "content-type": "application/json"}
        model = http.get("/v1/models", headers=user).json()["data"][0]["id"]
        conv = http.post("/v1/conversations", json={"title": "t"}, headers=user)
        assert conv.status_code == 200, conv.text

        background = _Stream(server, user_key, model)
        background.start()
        sent = 0

        chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        for field in CHAT_FIELDS:
            for fragment in HOSTILE:
                resp = http.post("/v1/chat/completions", content=_body(chat, (field,), fragment), headers=user)
                _check(resp, f"chat {field}={fragment[:40]}")
                sent += 1
        for field in MESSAGE_FIELDS:
            for fragment in HOSTILE:
                resp = http.post(
                    "/v1/chat/completions", content=_body(chat, ("messages", 0, field), fragment), headers=user
                )
                _check(resp, f"chat messages[0].{field}={fragment[:40]}")
                sent += 1
        completion = {"model": model, "prompt": "Hi", "max_tokens": 2}
        for field in COMPLETION_FIELDS:
            for fragment in HOSTILE:
                resp = http.post("/v1/completions", content=_body(completion, (field,), fragment), headers=user)
                _check(resp, f"completions {field}={fragment[:40]}")
                sent += 1
        key_body = {"name": "k", "scopes": ["inference"], "rpm_limit": 1, "tpm_limit": 1, "expires_in": "1d"}
        for field in key_body:
            for fragment in HOSTILE:
                resp = http.post("/admin/keys", content=_body(key_body, (field,), fragment), headers=jadmin)
                _check(resp, f"admin keys {field}={fragment[:40]}")
                sent += 1
        conv_body = {"title": "t", "messages": [{"role": "system", "content": "be brief"}]}
        for field in conv_body:
            for fragment in HOSTILE:
                resp = http.post("/v1/conversations", content=_body(conv_body, (field,), fragment), headers=user)
                _check(resp, f"conversations {field}={fragment[:40]}")
                sent += 1

        # path and query values
        odd = [
            "-1",
            "0",
            "12345678901234567890",
            "9" * 5000,
            "%ED%A0%80",
            "%00",
            "%FF%FE",
            "a" * 8000,
            "..%2F..%2Fetc%2Fpasswd",
            "1e308",
            "NaN",
        ]
        for value in odd:
            for method, path, headers in [
                ("GET", f"/v1/models/{value}", user),
                ("GET", f"/v1/conversations/{value}", user),
                ("GET", f"/v1/conversations/{value}/messages", user),
                ("DELETE", f"/v1/conversations/{value}", user),
                ("DELETE", f"/admin/keys/{value}", admin),
                ("GET", f"/admin/usage?since={value}", admin),
                ("GET", f"/admin/usage?until={value}d", admin),
                ("GET", f"/admin/usage?key_id={value}", admin),
                ("GET", f"/admin/usage?group_by={value}", admin),
                ("GET", f"/admin/keys?include_revoked={value}", admin),
                ("GET", f"/v1/conversations?limit={value}", user),
            ]:
                resp = http.request(method, path, headers=headers)
                _check(resp, f"{method} {path[:60]}")
                sent += 1
        for path in ["/health/live", "/health/ready", "/health", "/metrics", "/v1/models"]:
            _check(http.get(path, params={"x": "\x00" * 10}, headers=user), path)
        # not JSON at all, and the wrong content type
        for payload in [b"\xff\xfe\x00", b"", b"[]", b"null", b'"string"', b"{" * 100_000]:
            for path in ["/v1/chat/completions", "/v1/completions", "/admin/keys", "/v1/conversations"]:
                resp = http.post(path, content=payload, headers=jadmin if path.startswith("/admin") else user)
                _check(resp, f"{path} raw {payload[:20]!r}")
                sent += 1
        assert sent > 1100

        background.join(300)
        assert background.error is None, background.error
        assert background.finish == ["length"] * 3

        assert server.proc is not None and server.proc.poll() is None, server.stderr()[-3000:]
        assert http.get("/health/ready").status_code == 200
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=user_key, max_retries=0)
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=5, temperature=0
        )
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage is not None
    assert "Traceback" not in server.stderr(), server.stderr()[-3000:]
