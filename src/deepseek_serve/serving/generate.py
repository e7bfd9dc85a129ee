"""`serve_generation`: the flow shared by /v1/chat/completions and /v1/completions.

A route turns its body into a `GenerationPlan`; this carries it through the hook points of the
optional services, in this order:

1. `check_plan` (what only the engine knows)                -> 400
2. `limiter.admit` (reserve prompt + max_tokens)            -> 429 when refused
3. `response_cache` lookup (deterministic params only)      -> `x-cache: hit|miss`
4. `engine.add_request` for every choice (prompts x n)     -> 429 queue full, 400, 503
5. collect (JSON body) or stream (SSE)
6. response cache store, then the accounting (accounting.py): always once, also when a stream is cut

The answer is an `Answer`, a body or an event stream with its headers, which the HTTP layer sends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson

from deepseek_serve.contracts import Principal
from deepseek_serve.serving import response_cache
from deepseek_serve.serving.checks import check_plan
from deepseek_serve.serving.collect import Receive, collect_answer
from deepseek_serve.serving.failures import ApiError
from deepseek_serve.serving.plan import GenerationPlan
from deepseek_serve.serving.run import GenerationRun
from deepseek_serve.serving.services import Services
from deepseek_serve.serving.sse import SSE_HEADERS
from deepseek_serve.serving.stream import stream_events

JSON = "application/json"
EVENT_STREAM = "text/event-stream"


@dataclass
class Answer:
    """A generation's answer: `body` (JSON) or `events` (SSE), with its media type and headers."""

    media_type: str
    headers: dict[str, str]
    body: bytes = b""
    events: AsyncIterator[bytes] | None = None


async def _replay(events: list[bytes]) -> AsyncIterator[bytes]:
    for event in events:
        yield event


def _cache_key(services: Services, principal: Principal, plan: GenerationPlan) -> str | None:
    """The response-cache key when this request may use the cache, else None."""
    settings = services.settings
    if services.response_cache is None or not settings.response_cache:
        return None
    if not plan.use_cache or not plan.params.is_deterministic:
        return None
    owner = principal.key_id if settings.response_cache_scope == "key" else None
    return plan.response_cache_key(owner)


async def serve_generation(services: Services, principal: Principal, plan: GenerationPlan, receive: Receive) -> Answer:
    """Serve a planned generation (see the module docstring); `receive` is the request's ASGI receive,
    watched for a client that disconnects before a JSON answer is ready."""
    check_plan(services, plan)
    run = GenerationRun(services, principal, plan)
    await run.accounting.admit()
    cache = services.response_cache
    cache_key = _cache_key(services, principal, plan)
    if cache is not None and cache_key is not None:
        hit = response_cache.hit_body(await response_cache.lookup(cache, cache_key), plan.completion_id, plan.created)
        if services.metrics is not None:
            services.metrics.response_cache(hit is not None)
        if hit is not None:
            run.accounting.summarize_cache_hit(hit)
            await run.finish()  # usage record, limiter settle and the conversation turn, as for a miss
            headers = {**run.headers, "x-cache": "hit"}
            if plan.stream:
                replayed = response_cache.replay_sse(hit, plan.include_usage)
                return Answer(EVENT_STREAM, {**SSE_HEADERS, **headers}, events=_replay(replayed))
            return Answer(JSON, headers, body=orjson.dumps(hit))
    await run.submit()
    if plan.stream:
        headers = {**SSE_HEADERS, **run.headers}
        if cache_key is not None:
            headers["x-cache"] = "miss"
        events = stream_events(run, services.settings.keepalive_interval_s, cache_key)
        return Answer(EVENT_STREAM, headers, events=events)
    try:
        body = await collect_answer(run, receive)
    except ApiError as err:
        run.outcome.status = err.status
        err.headers = {**run.headers, **err.headers}
        raise
    finally:
        await run.finish()
    headers = run.headers
    if cache is not None and cache_key is not None:
        headers["x-cache"] = "miss"
        if run.outcome.finish_reason in ("stop", "length"):
            await response_cache.store(cache, cache_key, body)
    return Answer(JSON, headers, body=body)
