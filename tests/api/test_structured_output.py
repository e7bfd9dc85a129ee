"""Structured output through a real server process and the official openai SDK: `response_format`
json_object / json_schema is enforced by the grammar (every answer parses and validates), schemas the
grammar cannot enforce get a 400, and explicit nulls mean "not set". Each test runs against both
grammar engines (llama.cpp's sampler; llguidance when installed)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.support.server import ServeProcess

SCHEMAS: list[dict[str, Any]] = [
    {  # flat, enum, integer, boolean, required
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer"},
            "role": {"enum": ["admin", "user", "guest"]},
            "active": {"type": "boolean"},
        },
        "required": ["name", "age", "role", "active"],
        "additionalProperties": False,
    },
    {  # nested object
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 10},
            "location": {
                "type": "object",
                "properties": {"lat": {"type": "integer"}, "lon": {"type": "integer"}},
                "required": ["lat", "lon"],
                "additionalProperties": False,
            },
        },
        "required": ["city", "location"],
        "additionalProperties": False,
    },
    {  # array of enums with bounds
        "type": "object",
        "properties": {
            "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        },
        "required": ["colors"],
        "additionalProperties": False,
    },
    {  # array of objects, anyOf with null, $defs/$ref
        "$defs": {
            "item": {
                "type": "object",
                "properties": {"sku": {"type": "string", "maxLength": 6}, "qty": {"type": "integer"}},
                "required": ["sku", "qty"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "maxItems": 2},
            "note": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]},
        },
        "required": ["items", "note"],
        "additionalProperties": False,
    },
    {  # const and a top-level enum of objects' fields
        "type": "object",
        "properties": {
            "version": {"const": 2},
            "ok": {"type": "boolean"},
            "level": {"type": "string", "enum": ["low", "mid", "high"]},
        },
        "required": ["version", "ok", "level"],
        "additionalProperties": False,
    },
]

PROMPTS = [
    "Describe a person as JSON.",
    "Give me some data.",
    "Answer in JSON about a city.",
    "Make up an order.",
    "Return the settings.",
]


@pytest.fixture(scope="module", params=["llama", "llguidance"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """A server per grammar engine (DS_GRAMMAR_ENGINE): llama.cpp's sampler, and llguidance when the
    optional package is installed."""
    if request.param == "llguidance":
        pytest.importorskip("llguidance", reason="the optional grammar extra (llguidance) is not installed")
    with ServeProcess(
        Path(tmp_path_factory.mktemp("structured")),
        DS_MAX_BATCH_SIZE="8",
        DS_MAX_QUEUE_SIZE="64",
        DS_GRAMMAR_ENGINE=request.param,
    ) as srv:
        yield srv


MODEL = "SmolLM2-135M-Instruct"


class Weather(BaseModel):
    city: str
    unit: Literal["celsius", "fahrenheit"]
    days: list[int] = Field(max_length=3)  # the tiny test model would count on forever


def test_sdk_parse_with_pydantic_model(server: ServeProcess) -> None:
    client = server.openai_client()
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris for 2 days?"}],
        response_format=Weather,
        max_tokens=200,
        temperature=0,
    )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Weather)
    assert message.parsed.unit in ("celsius", "fahrenheit")


def test_json_object_mode_returns_an_object(server: ServeProcess) -> None:
    client = server.openai_client()
    for seed in range(3):
        chat = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "List three fruits."}],
            response_format={"type": "json_object"},
            max_tokens=200,
            temperature=0.8,
            seed=seed,
        )
        assert chat.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(chat.choices[0].message.content or ""), dict)


def test_streamed_json_schema_output_validates(server: ServeProcess) -> None:
    client = server.openai_client()
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPTS[0]}],
        stream=True,
        max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMAS[0], "strict": True}},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMAS[0])


def test_hundred_json_schema_requests_all_validate(server: ServeProcess) -> None:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)
    gate = asyncio.Semaphore(8)

    async def one(i: int) -> tuple[int, str | None, str]:
        schema = SCHEMAS[i % len(SCHEMAS)]
        async with gate:
            chat = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                max_tokens=160,
                temperature=0.9,
                seed=i,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": f"s{i % len(SCHEMAS)}", "schema": schema, "strict": True},
                },
            )
        return i, chat.choices[0].finish_reason, chat.choices[0].message.content or ""

    async def run_all() -> list[tuple[int, str | None, str]]:
        try:
            return await asyncio.gather(*(one(i) for i in range(100)))
        finally:
            await client.close()

    results = asyncio.run(run_all())
    valid = 0
    for i, reason, text in results:
        assert reason == "stop", (i, reason, text)
        jsonschema.validate(json.loads(text), SCHEMAS[i % len(SCHEMAS)])
        valid += 1
    assert valid == 100


@pytest.mark.parametrize(
    ("schema", "word"),
    [
        ({"type": "object", "not": {"required": ["a"]}}, "'not'"),
        ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 3}}}, "'minimum'"),
        ({"type": "string", "format": "email"}, "'email'"),
        ({"type": "array", "maxItems": 100000}, "maxItems"),
        ({"$ref": "https://example.com/schema.json"}, "reference"),
    ],
)
def test_schema_the_grammar_cannot_enforce_is_a_400(server: ServeProcess, schema: dict[str, Any], word: str) -> None:
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        timeout=30,
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        },
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format"
    assert word in error["message"]


def test_bad_response_format_shapes_are_400(server: ServeProcess) -> None:
    for fmt in ({"type": "yaml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": 3}}):
        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            timeout=30,
            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "response_format": fmt},
        )
        assert r.status_code == 400, (fmt, r.text)
        assert "response_format" in (r.json()["error"]["param"] or ""), r.text
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        timeout=30,
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "ignore_eos": True,
            "response_format": {"type": "json_object"},
        },
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "ignore_eos", r.text


def test_explicit_null_means_not_set(server: ServeProcess) -> None:
    nulls = {
        k: None
        for k in (
            "max_tokens",
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
            "logprobs",
            "top_logprobs",
            "response_format",
            "max_completion_tokens",
            "top_k",
            "min_p",
            "repetition_penalty",
            "min_tokens",
            "ignore_eos",
            "conversation_id",
            "cache",
        )
    }
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi", "name": None}], **nulls, "max_tokens": 4}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1
    comp = {
        "model": MODEL,
        "prompt": "Hi",
        "max_tokens": 3,
        "n": None,
        "echo": None,
        "suffix": None,
        "best_of": None,
        "logprobs": None,
        "stream": None,
    }
    r = httpx.post(f"{server.url}/v1/completions", json=comp, timeout=60)
    assert r.status_code == 200, r.text


async def test_torch_runner_decodes_under_a_grammar(tmp_path: Path) -> None:
    # random weights: left alone the model writes noise; under the grammar every answer, greedy or
    # sampled, is the schema's JSON (the schema's values are finite, so the grammar also ends it)
    pytest.importorskip("torch")
    pytest.importorskip("llguidance")
    from deepseek_serve.engine.async_engine import AsyncEngine
    from deepseek_serve.engine.types import GenerationRequest, SamplingParams
    from deepseek_serve.serving.structured import schema_grammar
    from tests.support.settings import make_settings
    from tests.support.torch_models import CODER, tiny_checkpoint

    folder, _ = tiny_checkpoint(tmp_path / "ckpt", CODER, with_tokenizer=True)
    engine = AsyncEngine.from_settings(
        make_settings(
            tmp_path,
            model=str(folder),
            runner="torch",
            device="cpu",
            max_batch_size=4,
            max_model_len=256,
            context_length=512,
        )
    )
    assert engine.model_info.runner == "torch"
    schema = {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"enum": [1, 2, 3]},
        },
        "required": ["ok", "color", "size"],
        "additionalProperties": False,
    }
    grammar = schema_grammar(schema)
    await engine.start()
    try:

        async def run(i: int, params: SamplingParams, prompt: str = "") -> tuple[str, str | None]:
            req = GenerationRequest(request_id=f"g{i}", prompt=prompt or f"answer {i}", params=params)
            text, last = await engine.complete(req)
            return text, last.finish_reason

        plain = SamplingParams(temperature=0.0, max_tokens=24)
        free_text, _ = await run(0, plain)
        answers = await asyncio.gather(
            run(1, SamplingParams(temperature=0.0, max_tokens=200, grammar=grammar)),
            *(run(2 + i, SamplingParams(temperature=1.0, seed=i, max_tokens=200, grammar=grammar)) for i in range(3)),
            run(9, plain, "answer 0"),  # an unconstrained neighbour in the same batch
        )
    finally:
        await engine.shutdown()
    with pytest.raises(ValueError):
        json.loads(free_text)
    for text, finish in answers[:4]:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), schema)
    assert answers[4][0] == free_text  # the grammar rows left the other row alone
