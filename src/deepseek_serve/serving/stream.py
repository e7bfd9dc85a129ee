"""A streaming answer: server-sent events as the choices generate.

Per choice an opening chunk, then one chunk per delta (keep-alive comments while a choice is still
queued), the usage chunk when asked, then `[DONE]`. A generation that fails mid-stream ends with an
error event instead (the status line is long sent). A client that disconnects cancels the generator
(Starlette does, for ASGI spec < 2.4, as Uvicorn reports), which aborts the unfinished choices;
the accounting runs in every case, before the client sees `[DONE]` when the stream completes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import orjson

from deepseek_serve.engine.types import StreamDelta
from deepseek_serve.serving import response_cache
from deepseek_serve.serving.choice import ChoiceState
from deepseek_serve.serving.failures import ApiError, from_finish_reason
from deepseek_serve.serving.render import delta_event, opening_event, render_body, usage_event
from deepseek_serve.serving.run import GenerationRun
from deepseek_serve.serving.sse import DONE, KEEPALIVE, sse_event

logger = logging.getLogger(__name__)

_Arrival = tuple[ChoiceState, StreamDelta | BaseException]


async def _forward_deltas(choice: ChoiceState, queue: asyncio.Queue[_Arrival]) -> None:
    try:
        async for delta in choice.stream:
            queue.put_nowait((choice, delta))
    except Exception as exc:
        queue.put_nowait((choice, exc))


async def stream_events(run: GenerationRun, keepalive_s: float, cache_key: str | None) -> AsyncIterator[bytes]:
    """The SSE body of a submitted run; `cache_key`: store the answer under it once it completes."""
    plan = run.plan
    queue: asyncio.Queue[_Arrival] = asyncio.Queue()
    forwarders = [asyncio.ensure_future(_forward_deltas(c, queue)) for c in run.choices]
    remaining = len(run.choices)
    try:
        for c in run.choices:
            event = opening_event(plan, c)
            if event is not None:
                yield event
        failure: ApiError | None = None
        scheduled = False
        while remaining:
            if not scheduled:
                scheduled = all(c.stream.scheduled.is_set() for c in run.choices)
            if scheduled:
                choice, item = await queue.get()
            else:
                try:
                    choice, item = await asyncio.wait_for(queue.get(), keepalive_s)
                except TimeoutError:
                    yield KEEPALIVE
                    continue
            if isinstance(item, BaseException):
                raise item
            choice.add_delta(item)
            if item.finished:
                remaining -= 1
                failure = from_finish_reason(item.finish_reason, run.services.settings.request_timeout_s)
                if failure is not None:
                    if item.finish_reason == "error":
                        logger.error("generation failed mid-stream: %s", item.error)
                    break
            event = delta_event(plan, choice, item)
            if event is not None:
                yield event
        outcome = run.summarize()
        if failure is not None:
            yield sse_event(orjson.dumps(failure.body()))
        else:
            outcome.completed = True
            cache = run.services.response_cache
            if (
                cache_key is not None
                and cache is not None
                and all(c.finish_reason in ("stop", "length") for c in run.choices)
            ):
                await response_cache.store(cache, cache_key, render_body(plan, run.choices, outcome))
            if plan.include_usage:
                yield usage_event(plan, outcome)
            await run.finish()  # accounting (the usage record durable) before the client sees [DONE]
        yield DONE
    finally:
        for task in forwarders:
            task.cancel()
        if not run.accounting.summarized:
            run.summarize().finish_reason = "abort"  # the client went away mid-stream
        await run.finish()
