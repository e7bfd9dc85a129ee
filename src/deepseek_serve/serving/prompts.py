"""Prompt preparation: the chat template and the tokenizer, off the event loop for large inputs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson

from deepseek_serve.serving.services import Services

# Inputs under this many characters are rendered and tokenized on the event loop (at most a few ms
# there); larger ones in a worker thread. bench/loop_stall.py --inline-check times both ways.
INLINE_CHARS = 16_384


async def tokenize(services: Services, text: str, add_special_tokens: bool) -> tuple[int, ...]:
    """Tokenize off the event loop when the text is long (tokenizing a few MB takes a while)."""
    fn: Callable[[], list[int]] = lambda: services.engine.tokenize(text, add_special_tokens)  # noqa: E731
    ids = fn() if len(text) < INLINE_CHARS else await asyncio.to_thread(fn)
    return tuple(ids)


async def render_chat(services: Services, messages: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> str:
    """The chat template applied to `messages` (generation prompt added; `extra`: more template variables,
    such as `tools`); off the event loop when the conversation is long, as Jinja holds the GIL for the
    whole render."""
    size = sum(len(m.get("content") or "") for m in messages) + 64 * len(messages)
    if extra:
        size += len(orjson.dumps(extra))
    fn: Callable[[], str] = lambda: services.engine.render_chat(  # noqa: E731
        messages, add_generation_prompt=True, **(extra or {})
    )
    return fn() if size < INLINE_CHARS else await asyncio.to_thread(fn)
