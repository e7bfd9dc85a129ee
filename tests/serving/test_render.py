"""The text-only chunk: its pre-built template gives the same bytes as the response models."""

from __future__ import annotations

import orjson
import pytest

from deepseek_serve.engine.types import SamplingParams, StreamDelta
from deepseek_serve.serving.choice import ChoiceState
from deepseek_serve.serving.plan import GenerationPlan, PromptInput
from deepseek_serve.serving.render import delta_event, text_event
from deepseek_serve.serving.schemas import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    Completion,
    CompletionChoice,
)
from deepseek_serve.serving.sse import model_event

TEXTS = [
    "hello",
    " world",
    "",
    'quote " and backslash \\ and slash /',
    "".join(chr(c) for c in range(32)) + "\x7f",  # every control character
    "line\u0085next\u2028sep\u2029para",  # raw line breaks that SSE readers split on
    "é ü ß 日本語 한국어 🙂 \U0001f600",
    "\ue000text\ue000",  # the template's own marker
    "data: [DONE]\n\n",
]


def plan(endpoint: str, model: str = 'model "x" \u2028') -> GenerationPlan:
    return GenerationPlan(
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_id="chatcmpl-abc",
        model=model,
        prompts=(PromptInput((1, 2), "hi"),),
        params=SamplingParams(max_tokens=8),
        stream=True,
    )


def choice(index: int) -> ChoiceState:
    return ChoiceState(index=index, prompt_index=0, stream=None, splitter=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("index", [0, 3])
def test_chat_text_chunk_matches_the_models(text: str, index: int) -> None:
    p, c = plan("chat.completions"), choice(index)
    expected = model_event(
        ChatCompletionChunk(
            id=p.completion_id,
            created=p.created,
            model=p.model,
            choices=[ChatChunkChoice(index=index, delta=ChatDelta(content=text))],
        )
    )
    assert text_event(p, c, text) == expected
    # the stream's own path for a plain delta takes the template (no text yet: no event)
    assert delta_event(p, c, StreamDelta(text=text, token_ids=(1,))) == (expected if text else None)
    assert b"\xe2\x80\xa8" not in expected and b"\xc2\x85" not in expected
    assert orjson.loads(expected.removeprefix(b"data: "))["choices"][0]["delta"]["content"] == text


@pytest.mark.parametrize("text", TEXTS)
def test_completion_text_chunk_matches_the_models(text: str) -> None:
    p, c = plan("completions"), choice(1)
    expected = model_event(
        Completion(
            id=p.completion_id,
            created=p.created,
            model=p.model,
            choices=[CompletionChoice(index=1, text=text, finish_reason=None)],
        )
    )
    assert text_event(p, c, text) == expected
    assert delta_event(p, c, StreamDelta(text=text, token_ids=(1,))) == (expected if text else None)


def test_the_last_chunk_still_carries_the_finish_reason() -> None:
    p, c = plan("chat.completions"), choice(0)
    event = delta_event(p, c, StreamDelta(text="end", token_ids=(1,), finished=True, finish_reason="length"))
    assert event is not None
    body = orjson.loads(event.removeprefix(b"data: "))
    assert body["choices"][0] == {
        "index": 0,
        "delta": {"role": None, "content": "end", "reasoning_content": None, "tool_calls": None},
        "logprobs": None,
        "finish_reason": "length",
    }


def test_a_lone_surrogate_falls_back_to_the_models() -> None:
    assert text_event(plan("chat.completions"), choice(0), "\ud800") is None
