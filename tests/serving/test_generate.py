"""serve_generation without a model: a fake engine that must not be reached, an in-memory response cache."""

from __future__ import annotations

import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest

from deepseek_serve.contracts import Principal
from deepseek_serve.engine.types import SamplingParams
from deepseek_serve.observability.metrics import PrometheusMetrics
from deepseek_serve.serving.generate import serve_generation
from deepseek_serve.serving.plan import GenerationPlan, PromptInput
from deepseek_serve.serving.services import Services
from tests.support.settings import make_settings

MODEL = "test-model"


class MemoryCache:
    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}

    async def get(self, key: str) -> bytes | None:
        return self.entries.get(key)

    async def put(self, key: str, value: bytes) -> None:
        self.entries[key] = value


class UnreachableEngine:
    """Accepts the plan's checks; any generation would be a bug in a cache hit."""

    model_info = types.SimpleNamespace(id=MODEL, max_model_len=4096)

    def check_request(self, params: SamplingParams, token_ids: tuple[int, ...], context: bool = True) -> None:
        return None

    async def add_request(self, request: Any) -> Any:
        raise AssertionError("a cache hit reached the engine")


def stored_answer() -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-old",
            "object": "chat.completion",
            "created": 1,
            "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
    )


async def never_called() -> Mapping[str, Any]:
    raise AssertionError("a cache hit does not wait for the client")


@pytest.mark.parametrize("stream", [False, True])
async def test_a_cache_hit_is_recorded_as_a_request(tmp_path: Path, stream: bool) -> None:
    settings = make_settings(tmp_path, response_cache=True, redis_url="")
    cache = MemoryCache()
    metrics = PrometheusMetrics(process_metrics=False)
    services = Services(settings=settings, engine=UnreachableEngine(), response_cache=cache, metrics=metrics)  # type: ignore[arg-type]
    plan = GenerationPlan(
        endpoint="chat.completions",
        completion_id="chatcmpl-new",
        model=MODEL,
        prompts=(PromptInput((1, 2, 3), "hello"),),
        params=SamplingParams(max_tokens=8, temperature=0.0),
        stream=stream,
    )
    cache.entries[plan.response_cache_key(None)] = stored_answer()

    answer = await serve_generation(services, Principal(key_id=None), plan, never_called)

    assert answer.headers["x-cache"] == "hit"
    if stream:
        assert answer.events is not None
        assert [event async for event in answer.events][-1] == b"data: [DONE]\n\n"
    else:
        assert orjson.loads(answer.body)["id"] == "chatcmpl-new"
    registry = metrics.registry
    assert registry.get_sample_value("ds_response_cache_requests_total", {"result": "hit"}) == 1
    assert registry.get_sample_value("llm_request_success_total", {"finish_reason": "cached"}) == 1
    assert registry.get_sample_value("llm_request_prompt_tokens_count") == 1
    assert registry.get_sample_value("llm_request_generation_tokens_sum") == 1
    assert registry.get_sample_value("llm_e2e_request_latency_seconds_count") == 1
    assert registry.get_sample_value("llm_time_to_first_token_seconds_count") == 0  # no engine work
