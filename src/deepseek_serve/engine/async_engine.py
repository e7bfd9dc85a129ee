"""AsyncEngine: the one interface routes use to talk to the model.

The scheduler loop (`LLMEngine.step`) runs in one worker thread; native forward passes release
the GIL, so the event loop stays responsive. Each request gets a `RequestStream` (an async
iterator of `StreamDelta`); the worker thread hands each step's deltas, all requests' together, to
the event loop with one `call_soon_threadsafe`.

Submission errors (`QueueFullError`, `ContextLengthError`, `InvalidRequestError`,
`EngineStoppedError`) are raised by `add_request` itself, before any streaming starts.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

from deepseek_serve.engine import prefix_summary
from deepseek_serve.engine.chat_template import ChatTemplate
from deepseek_serve.engine.errors import EngineStoppedError, InvalidRequestError
from deepseek_serve.engine.llm_engine import LLMEngine
from deepseek_serve.engine.loader import load_model
from deepseek_serve.engine.types import (
    EngineState,
    EngineStats,
    GenerationRequest,
    ModelInfo,
    SamplingParams,
    StreamDelta,
    merge_deltas,
)

if TYPE_CHECKING:
    from deepseek_serve.config import Settings

logger = logging.getLogger(__name__)


class RequestStream(AsyncIterator[StreamDelta]):
    """Deltas of one request. Closing it (or the task being cancelled) before the last delta
    aborts the request and frees its KV at once.

    Two ways to read it: iterate (one delta per engine step), or `take()` everything that arrived
    since the last call, merged, after a `listener` set with `set_listener` said that something came
    (one consumer can watch several streams, and a consumer slower than the engine sends one event
    for several steps instead of falling further behind)."""

    def __init__(self, engine: AsyncEngine, request_id: str, num_prompt_tokens: int) -> None:
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self._engine = engine
        self._pending: deque[StreamDelta] = deque()
        self._arrivals: list[tuple[float, int]] = []  # (monotonic time, tokens) of each pending delta with tokens
        self._waiter: asyncio.Future[None] | None = None
        self._listener: Callable[[], None] | None = None
        self._finished = False  # the reader has the last delta (or closed the stream)
        self._ended = False  # the last delta has arrived
        self.scheduled = asyncio.Event()  # set when the request leaves the waiting queue

    def _put(self, delta: StreamDelta) -> None:
        self._pending.append(delta)
        if delta.finished:
            self._ended = True
        if delta.token_ids and self._listener is not None:
            self._arrivals.append((time.monotonic(), len(delta.token_ids)))
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        if self._listener is not None:
            self._listener()

    def set_listener(self, listener: Callable[[], None] | None) -> None:
        """Call `listener()` (on the event loop) each time a delta arrives; `take()` then also
        reports arrival times."""
        self._listener = listener

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def ended(self) -> bool:
        """The request's last delta has arrived (read or not)."""
        return self._ended

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def take(self) -> tuple[list[StreamDelta], list[tuple[float, int]]]:
        """What arrived since the last call: the deltas merged into one (`merge_deltas`), except that
        a last delta that ends the request unsuccessfully (error, timeout, abort: its text is not
        sent) stays apart from the ones before it; and the arrival times of the deltas with tokens.
        ([], []) when nothing is pending."""
        pending = self._pending
        if not pending:
            return [], []
        arrivals = self._arrivals
        self._arrivals = []
        if len(pending) == 1:
            deltas = [pending.popleft()]
        else:
            items = list(pending)
            pending.clear()
            last = items[-1]
            if last.finished and last.finish_reason not in ("stop", "length"):
                deltas = [merge_deltas(items[:-1]), last]
            else:
                deltas = [merge_deltas(items)]
        if deltas[-1].finished:
            self._finished = True
        return deltas, arrivals

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamDelta:
        if self._finished:
            raise StopAsyncIteration
        while not self._pending:
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            except BaseException:
                self._waiter = None
                await self.aclose()
                raise
        delta = self._pending.popleft()
        if delta.finished:
            self._finished = True
        return delta

    async def aclose(self) -> None:
        """Abort the request if it has not finished; safe to call more than once."""
        if not self._finished:
            self._finished = True
            self._engine.abort(self.request_id)


class AsyncEngine:
    """Owns the scheduler core and its worker thread. Create with `from_settings`, then `start()`."""

    def __init__(
        self,
        core: LLMEngine,
        model_info: ModelInfo,
        chat_template: ChatTemplate | None,
        default_system_prompt: str | None = None,
    ) -> None:
        self._core = core
        # added when a conversation has no system message; None keeps the template's own default
        self._default_system = default_system_prompt
        self.model_info = model_info
        self._template = chat_template
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stopping = False
        self._accepting = False
        self._summary_of: list[Any] = []  # the cache entries `_summary` was computed from
        self._summary = ""

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: Settings) -> AsyncEngine:
        """Resolve the model (downloading if needed), load it with the configured runner."""
        loaded = load_model(settings)
        return cls(loaded.core, loaded.info, loaded.template, default_system_prompt=loaded.default_system_prompt)

    # --- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Stop accepting; let in-flight requests finish for up to `drain_timeout_s`; abort the rest."""
        self._accepting = False
        deadline = time.monotonic() + drain_timeout_s
        while self._core.has_work() and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a thread
            await asyncio.sleep(0.05)
        for request_id in list(self._streams):
            self.abort(request_id)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)
            self._thread = None
        self._core.close()

    @property
    def num_streams(self) -> int:
        """Requests with an open stream (queued, running, or not yet read to their end)."""
        return len(self._streams)

    @property
    def is_accepting(self) -> bool:
        return self._accepting

    # --- requests ----------------------------------------------------------------------------------
    async def add_request(self, request: GenerationRequest) -> RequestStream:
        """Tokenize, validate and enqueue. Raises before any work when the request cannot be served."""
        if not self._accepting:
            raise EngineStoppedError("the engine is not accepting requests (starting or shutting down)")
        seq = self._core.make_sequence(request)  # validates; raises InvalidRequest/ContextLength
        stream = RequestStream(self, request.request_id, seq.num_prompt_tokens)
        self._streams[request.request_id] = stream
        try:
            self._core.add_sequence(seq)  # raises QueueFullError
        except BaseException:
            self._streams.pop(request.request_id, None)
            raise
        self._wake.set()
        return stream

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        """Convenience: add the request and yield its deltas."""
        stream = await self.add_request(request)
        try:
            async for delta in stream:
                yield delta
        finally:
            await stream.aclose()

    async def complete(self, request: GenerationRequest) -> tuple[str, StreamDelta]:
        """Run a request to the end; returns (full text, last delta)."""
        parts: list[str] = []
        last: StreamDelta | None = None
        async for delta in self.generate(request):
            parts.append(delta.text)
            last = delta
        assert last is not None and last.finished
        return "".join(parts), last

    def abort(self, request_id: str) -> None:
        """Abort a request; its KV is freed by the next scheduler iteration (well under one step)."""
        self._core.abort(request_id)
        self._wake.set()

    async def clear_prefix_cache(self) -> None:
        """Drop the KV that finished requests keep for prefix reuse (benchmarks use it between runs)."""
        done = self._core.request_prefix_cache_clear()
        self._wake.set()
        await asyncio.to_thread(done.wait, 10.0)

    async def probe(self, timeout_s: float = 10.0) -> bool:
        """Generate one token end to end; True when the engine answered in time."""
        request = GenerationRequest(
            request_id=f"probe-{time.monotonic_ns()}",
            prompt_token_ids=(self.tokenizer_bos_or_first(),),
            params=SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
            deadline_s=timeout_s,
        )
        try:
            async with asyncio.timeout(timeout_s):
                _, last = await self.complete(request)
            return last.finish_reason in ("length", "stop")
        except Exception:
            return False

    def tokenizer_bos_or_first(self) -> int:
        ids = self._core.tokenizer.encode("Hi", add_special_tokens=True)
        return ids[0] if ids else 0

    # --- text helpers ------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._core.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """Text of token ids; InvalidRequestError (param `prompt`) for an id outside the vocabulary."""
        ids = list(token_ids)
        self._core.check_token_ids(ids)
        return self._core.tokenizer.decode(ids)

    def check_request(self, params: SamplingParams, prompt_token_ids: Sequence[int], context: bool = True) -> int:
        """The checks `add_request` makes (sampling values, token ids, vocabulary-bound fields and, with
        `context`, prompt + max_tokens within the context), without enqueuing; returns the completion
        budget. Routes call it before the rate limiter or the response cache see the request."""
        return self._core.check_request(params, list(prompt_token_ids), context)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render messages with the model's chat template (sandboxed Jinja, Hugging Face semantics).

        The rendered text already holds the template's special tokens (BOS...): submit it with
        `GenerationRequest(add_special_tokens=False)`, as Hugging Face's apply_chat_template does.
        Raises InvalidRequestError when the template rejects the conversation (`raise_exception`).
        """
        if self._template is None:
            raise InvalidRequestError("this model has no chat template; use /v1/completions", param="messages")
        if self._default_system is not None and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": self._default_system}, *messages]
        return self._template.render(messages, add_generation_prompt=add_generation_prompt, **extra)

    def stats(self) -> EngineStats:
        return self._core.stats(is_running=self._thread is not None and not self._stopping)

    def prefix_cache_summary(self) -> str:
        """What the prefix cache holds, as `prefix_summary.encode(summarize(entries))` (bounded, see
        engine/prefix_summary.py); recomputed only when the cached entries changed."""
        entries = self._core.runner.cached_prefixes()
        same = len(entries) == len(self._summary_of) and all(
            a is b for a, b in zip(entries, self._summary_of, strict=False)
        )
        if not same:
            self._summary = prefix_summary.encode(prefix_summary.summarize(entries))
            self._summary_of = entries
        return self._summary

    def metrics_snapshot(self) -> EngineState:
        """What `/metrics` exports of the engine (a gateway's `stats()` included)."""
        return EngineState(stats=self.stats(), accepting=self._accepting)

    # --- worker thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        assert self._loop is not None
        loop = self._loop
        while not self._stopping:
            if not self._core.has_work():
                self._wake.wait(0.5)
                self._wake.clear()
                if self._core.has_work():
                    self._gather_burst()
                continue
            try:
                outputs = self._core.step()
            except Exception:
                logger.exception("engine step failed")
                outputs = self._core.fail_all("internal engine error")
            if outputs:
                loop.call_soon_threadsafe(self._deliver, outputs)

    def _gather_burst(self) -> None:
        """The engine was idle and a request came: while more keep arriving (clients starting together, a
        wave of follow-up turns), wait for them, so they are admitted into one step and prefilled together
        (their shared prefix once) instead of the first alone and the rest a whole prefill step later."""
        wait = self._core.config.burst_wait_s
        if wait <= 0:
            return
        deadline = time.monotonic() + 4 * wait
        seen = self._core.scheduler.num_waiting
        while not self._stopping and time.monotonic() < deadline:
            time.sleep(wait)
            now = self._core.scheduler.num_waiting
            if now == seen:
                return
            seen = now

    def _deliver(self, outputs: list[tuple[str, StreamDelta | None, bool]]) -> None:
        for request_id, delta, scheduled in outputs:
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            if scheduled:
                stream.scheduled.set()
            if delta is None:
                continue
            if delta.finished:
                stream.scheduled.set()
                self._streams.pop(request_id, None)
            stream._put(delta)
