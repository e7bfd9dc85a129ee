"""A streaming answer: server-sent events as the choices generate.

Per choice an opening chunk, then a chunk per delta, several engine steps' deltas merged into one
when the stream runs behind the engine (keep-alive comments while a choice is still queued), the
usage chunk when asked, then `[DONE]`. A generation that fails mid-stream ends with an error event
instead (the status line is long sent). A client that disconnects cancels the generator
(Starlette does, for ASGI spec < 2.4, as Uvicorn reports), which aborts the unfinished choices;
the accounting runs in every case, before the client sees `[DONE]` when the stream completes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import orjson

from deepseek_serve.serving import response_cache
from deepseek_serve.serving.failures import ApiError, from_finish_reason
from deepseek_serve.serving.render import delta_event, opening_event, render_body, usage_event
from deepseek_serve.serving.run import GenerationRun
from deepseek_serve.serving.sse import DONE, KEEPALIVE, sse_event

logger = logging.getLogger(__name__)


async def stream_events(run: GenerationRun, keepalive_s: float, cache_key: str | None) -> AsyncIterator[bytes]:
    """The SSE body of a submitted run; `cache_key`: store the answer under it once it completes."""
    plan = run.plan
    # one signal for all the choices: the engine's hand-off of a step sets it once per choice that
    # got a delta, and this generator wakes once, takes what every choice got and sends it as one
    # write. When the client or this loop is slower than the engine, the deltas of several steps
    # go out as one chunk (OpenAI streams may carry several tokens per delta).
    arrived = asyncio.Event()
    for c in run.choices:
        c.stream.set_listener(arrived.set)
    open_choices = list(run.choices)
    settings = run.services.settings
    engine = run.services.engine
    coalesce_s = settings.stream_coalesce_ms / 1000.0
    loop = asyncio.get_running_loop()
    last_sent = 0.0
    try:
        for c in run.choices:
            event = opening_event(plan, c)
            if event is not None:
                yield event
        failure: ApiError | None = None
        scheduled = False
        while open_choices and failure is None:
            arrived.clear()
            if not any(c.stream.has_pending for c in open_choices):
                if not scheduled:
                    scheduled = all(c.stream.scheduled.is_set() for c in run.choices)
                if scheduled:
                    await arrived.wait()
                else:
                    try:
                        await asyncio.wait_for(arrived.wait(), keepalive_s)
                    except TimeoutError:
                        yield KEEPALIVE
                continue
            if coalesce_s > 0 and engine.num_streams >= settings.stream_coalesce_streams:
                # under heavy load, one event per interval: each write costs the loop a send() and
                # the chunk's framing while holding the GIL the engine thread needs between steps
                wait = last_sent + coalesce_s - loop.time()
                if wait > 0 and not any(c.stream.ended for c in open_choices):
                    await asyncio.sleep(wait)
            events: list[bytes] = []
            for choice in list(open_choices):
                deltas, arrivals = choice.stream.take()
                for item in deltas:
                    choice.add_delta(item, arrivals)
                    arrivals = []
                    if item.finished:
                        open_choices.remove(choice)
                        failure = from_finish_reason(item.finish_reason, run.services.settings.request_timeout_s)
                        if failure is not None:
                            if item.finish_reason == "error":
                                logger.error("generation failed mid-stream: %s", item.error)
                            break
                    event = delta_event(plan, choice, item)
                    if event is not None:
                        events.append(event)
                if failure is not None:
                    break
            if events:
                last_sent = loop.time()
                yield events[0] if len(events) == 1 else b"".join(events)
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
        for c in run.choices:
            c.stream.set_listener(None)
        if not run.accounting.summarized:
            run.summarize().finish_reason = "abort"  # the client went away mid-stream
        await run.finish()
