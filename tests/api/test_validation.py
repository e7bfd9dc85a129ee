"""Validation at the boundary, in process (the real engine behind `create_app`): every bad value is a 400
in OpenAI's error shape naming its field, before any engine work; the runners refuse what would crash a
native library and fail only the request to blame."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest
import pytest_asyncio

from deepseek_serve.api.app import create_app
from deepseek_serve.engine.async_engine import AsyncEngine
from deepseek_serve.engine.types import GenerationRequest, SamplingParams
from deepseek_serve.storage.keys import generate_secret
from tests.support.api import asgi_client
from tests.support.settings import make_settings
from tests.support.storage import BACKENDS, database_url

ADMIN_KEY = generate_secret()
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def client(engine: AsyncEngine, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(tmp_path_factory.mktemp("validation"), redis_url="", response_cache=False)
    app = create_app(settings, engine=engine)
    async with asgi_client(app, raise_app_exceptions=False) as c:
        yield c


def assert_400(
    resp: httpx.Response, param: str | None, code: str | None = None, prefix: bool = False
) -> dict[str, Any]:
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    err: dict[str, Any] = body["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if prefix:
        assert param is not None and str(err["param"]).startswith(param), err
    else:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def raw(body: str) -> dict[str, Any]:
    """httpx kwargs for a body sent byte for byte (json= cannot encode a lone surrogate)."""
    return {"content": body.encode(), "headers": {"content-type": "application/json"}}


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **extra}


def idle(engine: AsyncEngine) -> bool:
    stats = engine.stats()
    return stats.num_running == 0 and stats.num_waiting == 0


# --- strings a native library would choke on ------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"model": "%M", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
        ('{"model": "%M", "messages": [{"role": "user", "content": "a\\u0000b"}]}', "messages[0].content"),
        ('{"model": "\\udfff", "messages": [{"role": "user", "content": "x"}]}', "model"),
        (
            '{"model": "%M", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
            "messages[0].content[0].text",
        ),
        ('{"model": "%M", "messages": [{"role": "user", "name": "\\u0000", "content": "x"}]}', "messages[0].name"),
        ('{"model": "%M", "messages": [{"role": "user", "content": "x"}], "stop": ["\\ud800"]}', "stop[0]"),
    ],
)
async def test_chat_strings(client: httpx.AsyncClient, engine: AsyncEngine, body: str, param: str) -> None:
    resp = await client.post("/v1/chat/completions", **raw(body.replace("%M", engine.model_info.id)))
    err = assert_400(resp, param)
    assert any(word in err["message"] for word in ("surrogate", "NUL", "unicode")), err


@pytest.mark.parametrize(("prompt", "param"), [('"\\ud800"', "prompt"), ('["ok", "\\u0000"]', "prompt[1]")])
async def test_completion_strings(client: httpx.AsyncClient, engine: AsyncEngine, prompt: str, param: str) -> None:
    body = f'{{"model": "{engine.model_info.id}", "prompt": {prompt}, "max_tokens": 1}}'
    assert_400(await client.post("/v1/completions", **raw(body)), param)


# --- token ids ------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", [[[1, 2, -1]], [1, 2, 10**6], [[5], [2**63]], [10**30], [False], [[True, 5]]])
async def test_token_ids_outside_vocab(client: httpx.AsyncClient, engine: AsyncEngine, prompt: Any) -> None:
    # an id outside the vocabulary must never reach llama.cpp (std::out_of_range aborts the process);
    # booleans are not token ids (lax validation would read false as token 0)
    resp = await client.post(
        "/v1/completions", json={"model": engine.model_info.id, "prompt": prompt, "max_tokens": 1, "echo": True}
    )
    err = assert_400(resp, "prompt", prefix=True)
    assert "vocabulary" in err["message"] or "integer" in err["message"], err
    assert idle(engine)


async def test_huge_token_list_refused_by_length(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    resp = await client.post("/v1/completions", json={"model": engine.model_info.id, "prompt": [1] * 100_000})
    assert_400(resp, "prompt", "context_length_exceeded")


# --- numbers ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"top_k": 10**6}, "top_k"),  # above the vocabulary
        ({"top_k": 2**64}, "top_k"),  # beyond the torch sampler's int64 tensor
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": 10**30}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 2**40}, "max_completion_tokens"),
        ({"min_tokens": 2**40}, "min_tokens"),
        ({"seed": 2**70}, "seed"),
        ({"n": 17}, "n"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"stop": "y" * 257}, "stop"),
        ({"logit_bias": {"-1": 1}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"12": 101}}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
        ({"user": "u" * 257}, "user"),
        ({"conversation_id": "c" * 65}, "conversation_id"),
    ],
)
async def test_chat_numbers_and_lists(
    client: httpx.AsyncClient, engine: AsyncEngine, extra: dict[str, Any], param: str
) -> None:
    assert_400(await client.post("/v1/chat/completions", json=chat(engine.model_info.id, **extra)), param)
    assert idle(engine)


async def test_max_tokens_beyond_context_names_it(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    resp = await client.post("/v1/chat/completions", json=chat(engine.model_info.id, max_tokens=5000))
    err = assert_400(resp, "max_tokens", "context_length_exceeded")
    assert str(engine.model_info.max_model_len) in err["message"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-1e999"])
async def test_non_finite_numbers(client: httpx.AsyncClient, engine: AsyncEngine, literal: str) -> None:
    body = (
        f'{{"model": "{engine.model_info.id}", "messages": [{{"role": "user", "content": "x"}}], '
        f'"temperature": {literal}}}'
    )
    assert_400(await client.post("/v1/chat/completions", **raw(body)), "temperature")


async def test_choices_n_times_prompts(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    resp = await client.post(
        "/v1/completions", json={"model": engine.model_info.id, "prompt": ["a"] * 5, "n": 16, "max_tokens": 1}
    )
    err = assert_400(resp, "n")
    assert "80" in err["message"]
    assert_400(
        await client.post("/v1/completions", json={"model": engine.model_info.id, "prompt": "a", "logprobs": 6}),
        "logprobs",
    )


async def test_deep_nesting_and_wrong_types(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    deep = '{"model": "m", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    resp = await client.post("/v1/chat/completions", **raw(deep))
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
    assert_400(
        await client.post("/v1/chat/completions", json={"model": engine.model_info.id, "messages": {"role": "user"}}),
        "messages",
    )
    assert_400(
        await client.post(
            "/v1/chat/completions", json={"model": engine.model_info.id, "messages": [{"role": "user", "content": 5}]}
        ),
        "messages[0].content",
    )


# --- limits before work -----------------------------------------------------------------------------
async def test_message_count_refused_before_validation(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    body = orjson.dumps({"model": engine.model_info.id, "messages": [{"role": "user", "content": "hi"}] * 60_000})
    assert len(body) > 1_500_000
    started = time.perf_counter()
    resp = await client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    elapsed = time.perf_counter() - started
    err = assert_400(resp, "messages")
    assert "60000" in err["message"] and "1024" in err["message"]
    # generous: refused by a length check, not after validating, templating and tokenizing 60,000 messages
    # (about a minute of work); bench/loop_stall.py measures the real figure
    assert elapsed < 2.0, elapsed
    assert idle(engine)


async def test_message_limit_is_a_setting(engine: AsyncEngine, tmp_path: Any) -> None:
    settings = make_settings(
        tmp_path,
        redis_url="",
        response_cache=False,
        max_messages=3,
        max_choices=2,
        max_stop_sequences=1,
        max_stop_chars=4,
    )
    app = create_app(settings, engine=engine)
    model = engine.model_info.id
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            four = [{"role": "user", "content": "x"}] * 4
            assert_400(await c.post("/v1/chat/completions", json={"model": model, "messages": four}), "messages")
            assert_400(await c.post("/v1/chat/completions", json=chat(model, n=3)), "n")
            assert_400(await c.post("/v1/chat/completions", json=chat(model, stop=["a", "b"])), "stop")
            assert_400(await c.post("/v1/chat/completions", json=chat(model, stop="abcde")), "stop")
            ok = await c.post("/v1/chat/completions", json={**chat(model, n=2, stop="abcd"), "messages": four[:3]})
            assert ok.status_code == 200, ok.text


# --- logit_bias is applied --------------------------------------------------------------------------
@pytest.mark.parametrize("greedy", [True, False])
async def test_logit_bias_forces_a_token(client: httpx.AsyncClient, engine: AsyncEngine, greedy: bool) -> None:
    token = engine.tokenize(" banana", add_special_tokens=False)[0]
    sampling = {"temperature": 0} if greedy else {"temperature": 1.0, "seed": 7}
    resp = await client.post(
        "/v1/completions",
        json={
            "model": engine.model_info.id,
            "prompt": "The capital of France is",
            "max_tokens": 3,
            "ignore_eos": True,
            "logit_bias": {str(token): 100},
            **sampling,
        },
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"] == engine.detokenize([token]) * 3


# --- the runner refuses what would crash llama.cpp; only the request to blame fails -----------------
async def _run(engine: AsyncEngine, request_id: str, ids: tuple[int, ...], params: SamplingParams) -> Any:
    return await engine.complete(GenerationRequest(request_id=request_id, prompt_token_ids=ids, params=params))


@pytest.fixture
def unchecked(engine: AsyncEngine) -> Iterator[None]:
    """The engine's own submission checks switched off, as if a bug let bad input through them."""
    checker = engine._core.checker

    def passthrough(params: SamplingParams, ids: list[int], context: bool = True) -> int:
        return params.max_tokens or 4

    # the checker is a frozen dataclass: an instance attribute, set as its own __init__ sets fields,
    # shadows the method for this test
    object.__setattr__(checker, "check_request", passthrough)
    try:
        yield
    finally:
        object.__delattr__(checker, "check_request")


async def test_runner_refuses_bad_ids_alone(engine: AsyncEngine, unchecked: None) -> None:
    good_ids = tuple(engine.tokenize("Once upon a time"))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    bad, good = await asyncio.gather(
        _run(engine, "bad-ids", (1, 2, -1), params), _run(engine, "good-ids", good_ids, params)
    )
    assert bad[1].finish_reason == "error" and "vocabulary" in (bad[1].error or "")
    assert good[1].finish_reason == "length" and good[1].usage.completion_tokens == 8
    assert idle(engine)


async def test_sampler_build_failure_fails_alone(engine: AsyncEngine, unchecked: None) -> None:
    good_ids = tuple(engine.tokenize("Once upon a time"))
    bad_params = SamplingParams(max_tokens=4, temperature=0.5, logit_bias=((10**7, 1.0),))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    bad, good = await asyncio.gather(
        _run(engine, "bad-bias", good_ids, bad_params), _run(engine, "good-bias", good_ids, params)
    )
    assert bad[1].finish_reason == "error" and "logit_bias" in (bad[1].error or "")
    assert good[1].finish_reason == "length" and good[1].usage.completion_tokens == 6
    assert idle(engine)


def test_detokenize_refuses_outside_vocab(engine: AsyncEngine) -> None:
    from deepseek_serve.engine.errors import InvalidRequestError

    for bad in ([-1], [engine.model_info.vocab_size], [2**40]):
        with pytest.raises(InvalidRequestError):
            engine.detokenize(bad)


# --- admin API: values within the database columns and Python's dates -------------------------------
@pytest_asyncio.fixture(loop_scope="session", scope="module", params=BACKENDS)
async def admin(
    request: pytest.FixtureRequest, engine: AsyncEngine, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[httpx.AsyncClient]:
    tmp = tmp_path_factory.mktemp(f"admin-{request.param}")
    async with database_url(request.param, tmp) as url:
        settings = make_settings(
            tmp,
            database_url=url,
            auth="on",
            admin_key=ADMIN_KEY,
            db_auto_migrate=True,
            redis_url="",
            response_cache=False,
        )
        app = create_app(settings, engine)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://test", timeout=60
            ) as c,
        ):
            yield c


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "k", "expires_in": "99999999d"}, "expires_in"),
        ({"name": "k", "expires_in": "9" * 5000 + "d"}, "expires_in"),
        ({"name": "k", "rpm_limit": 2**31}, "rpm_limit"),
        ({"name": "k", "tpm_limit": 10**30}, "tpm_limit"),
        ({"name": "\u0000"}, "name"),
        ({"name": "k", "scopes": ["inference"] * 50}, "scopes"),
    ],
)
async def test_admin_create_key_bounds(admin: httpx.AsyncClient, body: dict[str, Any], param: str) -> None:
    assert_400(await admin.post("/admin/keys", json=body, headers=ADMIN), param)


async def test_admin_surrogate_name(admin: httpx.AsyncClient) -> None:
    assert_400(
        await admin.post(
            "/admin/keys", **{**raw('{"name": "\\ud800"}'), "headers": {**ADMIN, "content-type": "application/json"}}
        ),
        "name",
    )


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("since=99999999d", "since"),
        ("until=99999999w", "until"),
        ("since=0001-01-01T00:00:00%2B01:00", "since"),
        ("since=0999-12-31", "since"),
        ("key_id=12345678901234567890", "key_id"),
        ("key_id=-5", "key_id"),
    ],
)
async def test_admin_usage_bounds(admin: httpx.AsyncClient, query: str, param: str) -> None:
    assert_400(await admin.get(f"/admin/usage?{query}", headers=ADMIN), param)


async def test_admin_ranges_that_are_fine(admin: httpx.AsyncClient) -> None:
    ok = await admin.get("/admin/usage?since=36500d&until=9999-12-31&key_id=9223372036854775807", headers=ADMIN)
    assert ok.status_code == 200, ok.text
    created = await admin.post(
        "/admin/keys", json={"name": "long", "expires_in": "36500d", "rpm_limit": 2**31 - 1}, headers=ADMIN
    )
    assert created.status_code == 201, created.text
    assert_400(await admin.delete("/admin/keys/12345678901234567890", headers=ADMIN), "key_id")
    missing = await admin.delete("/admin/keys/9223372036854775807", headers=ADMIN)
    assert missing.status_code == 404, missing.text


# --- the CLI twins of the admin API -----------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["keys", "create", "--expires-in", "99999999d"],
        ["keys", "create", "--rpm", str(2**31)],
        ["keys", "create", "--name", "x" * 129],
        ["keys", "create", "--name", "a\udc80b"],  # what Python makes of a non-UTF-8 argv byte
        ["keys", "revoke", "12345678901234567890"],
        ["keys", "revoke", "0"],
        ["usage", "summary", "--since", "99999999d"],
        ["usage", "summary", "--since", "0001-01-01T00:00:00+01:00"],
        ["usage", "summary", "--key-id", "12345678901234567890"],
    ],
)
def test_cli_refuses_out_of_range(tmp_path: Any, args: list[str]) -> None:
    from typer.testing import CliRunner

    from deepseek_serve.cli import app

    env = {"DS_DATA_DIR": str(tmp_path), "DS_DATABASE_URL": "", "COLUMNS": "200"}
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


async def test_message_count_of_items_that_are_not_objects(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    """The counter reads only lists of objects; other items are counted after parsing, before validation."""
    body = orjson.dumps({"model": engine.model_info.id, "messages": ["hi"] * 60_000})
    resp = await client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert "60000" in assert_400(resp, "messages")["message"]


def test_gateway_engine_checks_like_the_local_engine(engine: AsyncEngine, tmp_path: Any) -> None:
    """The gateway's engine has no local scheduler core: it must answer check_request and detokenize
    itself (the API calls both before any upstream is chosen). No upstream is contacted here."""
    from deepseek_serve.engine.errors import ContextLengthError, InvalidRequestError
    from deepseek_serve.gateway.engine import GatewayEngine

    settings = make_settings(tmp_path, upstreams="http://127.0.0.1:9")
    gateway = GatewayEngine(settings, engine._core.tokenizer, None, engine.model_info)
    vocab = engine.model_info.vocab_size
    ok = SamplingParams(max_tokens=4)
    assert gateway.check_request(ok, [1, 2, 3]) == 4
    for params, ids, param in [
        (SamplingParams(top_k=vocab + 1), [1], "top_k"),
        (SamplingParams(logit_bias=((vocab, 1.0),)), [1], "logit_bias"),
        (ok, [1, -1], "prompt"),
        (SamplingParams(max_tokens=4, grammar='root ::= "x"'), [1], "response_format"),  # not forwarded: refused
    ]:
        with pytest.raises(InvalidRequestError) as caught:
            gateway.check_request(params, ids, context=False)
        assert caught.value.param == param
    with pytest.raises(ContextLengthError):
        gateway.check_request(SamplingParams(max_tokens=engine.model_info.max_model_len), [1])
    with pytest.raises(InvalidRequestError):
        gateway.detokenize([vocab])
    assert gateway.detokenize(engine.tokenize("Hello", add_special_tokens=False)) == "Hello"
