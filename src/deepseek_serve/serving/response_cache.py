"""The response cache on the request path: lookup, store, and a hit re-issued as a body or an SSE stream.

The cache stores the complete JSON body of a finished deterministic request (`chat.completion` or
`text_completion`). A hit gets the new request's id and timestamp and honest usage: no engine
work, so every prompt token is a cache hit (`prompt_cache_hit_tokens = prompt_tokens`).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from deepseek_serve.contracts import ResponseCache
from deepseek_serve.serving.schemas import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    UsageInfo,
)
from deepseek_serve.serving.sse import DONE, model_event

logger = logging.getLogger(__name__)


async def lookup(cache: ResponseCache, key: str) -> bytes | None:
    """The stored body under `key`; None when absent or when the cache fails (a miss, logged)."""
    try:
        return await cache.get(key)
    except Exception:
        logger.warning("response cache get failed", exc_info=True)
        return None


async def store(cache: ResponseCache, key: str, body: bytes) -> None:
    """Store a finished answer; a failing cache is logged and otherwise ignored."""
    try:
        await cache.put(key, body)
    except Exception:
        logger.warning("response cache put failed", exc_info=True)


def hit_usage(usage: dict[str, Any] | None) -> UsageInfo:
    """The stored usage with the whole prompt counted as cache hits."""
    usage = usage or {}
    details = usage.get("completion_tokens_details") or {}
    return UsageInfo.build(
        int(usage.get("prompt_tokens", 0)),
        int(usage.get("completion_tokens", 0)),
        int(usage.get("prompt_tokens", 0)),
        int(details.get("reasoning_tokens", 0)),
    )


def hit_body(stored: bytes | None, completion_id: str, created: int) -> dict[str, Any] | None:
    """The stored body as this request's answer (new id and time, hit usage); None (a miss) when
    nothing is stored or the entry cannot be read."""
    if stored is None:
        return None
    try:
        return _reissue(stored, completion_id, created)
    except (ValueError, TypeError, KeyError):
        logger.warning("unreadable response cache entry ignored")
        return None


def _reissue(stored: bytes, completion_id: str, created: int) -> dict[str, Any]:
    body = orjson.loads(stored)
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        raise ValueError("not a cached completion body")
    body["id"] = completion_id
    body["created"] = created
    body["usage"] = hit_usage(body.get("usage")).model_dump()
    return body


def replay_sse(body: dict[str, Any], include_usage: bool) -> list[bytes]:
    """A hit body as the SSE events a live stream sends: per choice a role chunk, the reasoning,
    the content (with its logprobs) and the finish chunk; then usage if asked, then [DONE]."""
    events: list[bytes] = []
    common = {"id": body["id"], "created": body["created"], "model": body["model"]}
    chat = body.get("object") == "chat.completion"
    for choice in body["choices"]:
        index, finish = int(choice.get("index", 0)), choice.get("finish_reason")
        if chat:
            message = choice.get("message") or {}
            logprobs = ChatLogprobs.model_validate(choice["logprobs"]) if choice.get("logprobs") else None
            deltas: list[tuple[ChatDelta, ChatLogprobs | None, str | None]] = [
                (ChatDelta(role="assistant", content=""), None, None)
            ]
            if message.get("reasoning_content"):
                deltas.append((ChatDelta(reasoning_content=message["reasoning_content"]), None, None))
            deltas.append((ChatDelta(content=message.get("content") or ""), logprobs, None))
            deltas.append((ChatDelta(), None, finish))
            for delta, lp, reason in deltas:
                events.append(
                    model_event(
                        ChatCompletionChunk(
                            **common,
                            choices=[ChatChunkChoice(index=index, delta=delta, logprobs=lp, finish_reason=reason)],
                        )
                    )
                )
        else:
            logprobs_c = CompletionLogprobs.model_validate(choice["logprobs"]) if choice.get("logprobs") else None
            events.append(
                model_event(
                    Completion(
                        **common,
                        choices=[
                            CompletionChoice(
                                index=index, text=choice.get("text") or "", logprobs=logprobs_c, finish_reason=finish
                            )
                        ],
                    )
                )
            )
    if include_usage:
        usage = UsageInfo.model_validate(body["usage"])
        chunk: ChatCompletionChunk | Completion = (
            ChatCompletionChunk(**common, choices=[], usage=usage)
            if chat
            else Completion(**common, choices=[], usage=usage)
        )
        events.append(model_event(chunk))
    events.append(DONE)
    return events
