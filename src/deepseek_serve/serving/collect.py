"""A non-streaming answer: every choice generated to its end, then one JSON body.

A client that disconnects meanwhile aborts its choices at once: a watcher listens for the ASGI
`http.disconnect` while the choices generate.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from deepseek_serve.serving.accounting import overall_finish_reason
from deepseek_serve.serving.choice import ChoiceState
from deepseek_serve.serving.failures import FAILED_FINISH_REASONS, ApiError, from_finish_reason
from deepseek_serve.serving.render import render_body
from deepseek_serve.serving.run import GenerationRun

logger = logging.getLogger(__name__)

Receive = Callable[[], Awaitable[Mapping[str, Any]]]  # the request's ASGI `receive`

CLIENT_CLOSED = 499  # the client closed the request (nginx's code); nobody reads the body


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _generate_all(run: GenerationRun, receive: Receive) -> None:
    async def drain(choice: ChoiceState) -> None:
        async for delta in choice.stream:
            choice.add_delta(delta)

    tasks = [asyncio.ensure_future(drain(c)) for c in run.choices]
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        pending: set[asyncio.Future[None]] = set(tasks)
        while pending:
            done, _ = await asyncio.wait(pending | {watcher}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                raise ApiError(CLIENT_CLOSED, "client disconnected", "invalid_request_error")
            pending -= done
            for task in done:
                task.result()
    finally:
        watcher.cancel()
        for task in tasks:
            task.cancel()
        await run.close_streams()


async def collect_answer(run: GenerationRun, receive: Receive) -> bytes:
    """The JSON body of a submitted run; raises the mapped `ApiError` when the generation failed.
    The caller runs `run.finish()`."""
    await _generate_all(run, receive)
    if overall_finish_reason(run.choices) not in FAILED_FINISH_REASONS:
        for choice in run.choices:
            choice.split_whole_text()
    outcome = run.summarize()
    err = from_finish_reason(outcome.finish_reason, run.services.settings.request_timeout_s)
    if err is not None:
        if outcome.finish_reason == "error":
            errors = [c.error for c in run.choices if c.error]
            logger.error("generation failed: %s", errors[0] if errors else "unknown")
        raise err
    body = render_body(run.plan, run.choices, outcome)
    outcome.completed = True
    return body
