"""The generation flow shared by /v1/chat/completions and /v1/completions.

One request becomes a `Plan` (prompts already tokenized, sampling params, output options), then
`run_plan` carries it through the hook points of the optional services, in this order:

1. `limiter.admit` (reserve prompt + max_tokens)            -> 429 when refused
2. `response_cache.get` (deterministic, non-streaming only) -> `x-cache: hit|miss`
3. `engine.add_request` for every choice (prompts x n)     -> 429 queue full, 400, 503
4. collect (JSON body) or stream (SSE: keep-alive comments while queued, chunks, usage, [DONE])
5. `response_cache.put`, `conversations.append_turn`
6. always, also when a stream is cut: abort unfinished choices, `limiter.settle`,
   `usage.record`, `metrics.observe_request` / `metrics.rejected`

A client that disconnects aborts its sequences at once: for streams Starlette cancels the
generator (ASGI spec < 2.4, as Uvicorn reports), for JSON bodies a watcher task listens for
`http.disconnect`.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import anyio
import orjson
from fastapi import Request
from starlette.responses import Response, StreamingResponse

from deepseek_serve.api import cached
from deepseek_serve.api.errors import (
    ApiError,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
    from_engine_error,
)
from deepseek_serve.api.reasoning import ReasoningSplitter
from deepseek_serve.api.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    FunctionCallDelta,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    UsageInfo,
)
from deepseek_serve.api.services import Principal, RateLimitDecision, Services, UsageEvent
from deepseek_serve.api.sse import DONE, model_event, sse_event
from deepseek_serve.api.tools import ToolSetup, ToolStream, parse_tool_calls
from deepseek_serve.engine.async_engine import RequestStream
from deepseek_serve.engine.errors import ContextLengthError, DeadlineExceededError, EngineError, QueueFullError
from deepseek_serve.engine.types import (
    GenerationRequest,
    RequestTimings,
    SamplingDefaults,
    SamplingParams,
    StreamDelta,
    TokenLogprob,
)
from deepseek_serve.observability.logs import bind_log_fields

logger = logging.getLogger(__name__)

Endpoint = Literal["chat.completions", "completions"]

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_KEEPALIVE = b": keep-alive\n\n"


@dataclass(frozen=True)
class PromptInput:
    token_ids: tuple[int, ...]
    text: str  # rendered prompt (chat) or the prompt as given; used for echo, cache keys, storage


@dataclass(frozen=True)
class Plan:
    """Everything `run_plan` needs; built by the route from the validated body."""

    endpoint: Endpoint
    completion_id: str
    model: str
    prompts: tuple[PromptInput, ...]
    params: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    split_reasoning: bool = False  # chat with a reasoning model: <think> -> reasoning_content
    reasoning_prefilled: bool = False
    echo: bool = False
    use_cache: bool = True  # the body's `cache` extension; the cache also needs deterministic params
    conversation_id: str | None = None
    conversation_messages: tuple[dict[str, Any], ...] = ()  # this turn's new messages, for storage
    tools: ToolSetup | None = None  # chat with tools: answers are parsed into tool_calls
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p.token_ids) for p in self.prompts)


def new_completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_model(services: Services, model: str) -> str:
    """The served model id for a request's `model`; 404 for any other id."""
    served = services.engine.model_info.id
    if model != served:
        raise NotFoundError(
            f"The model '{model}' does not exist or you do not have access to it. This server serves '{served}'.",
            param="model",
            code="model_not_found",
        )
    return served


# --- per-choice state -------------------------------------------------------------------------------
@dataclass(eq=False)
class _Choice:
    index: int
    prompt_index: int
    stream: RequestStream
    splitter: ReasoningSplitter | None
    tool_stream: ToolStream | None = None
    text_parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    timings: RequestTimings | None = None
    arrivals: list[float] = field(default_factory=list)  # monotonic time of each delta with tokens

    def absorb(self, delta: StreamDelta) -> None:
        if delta.token_ids:
            self.arrivals.append(time.monotonic())
            # NOTE: a running count, so a stream cut before its last delta (client gone, drain timeout) still
            # accounts for the tokens it got; the last delta's usage replaces it.
            self.completion_tokens += len(delta.token_ids)
        if delta.text:
            self.text_parts.append(delta.text)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finished:
            self.finish_reason = delta.finish_reason
            self.error = delta.error
            self.timings = delta.timings
            if delta.usage is not None:
                self.prompt_tokens = delta.usage.prompt_tokens
                self.completion_tokens = delta.usage.completion_tokens
                self.cached_tokens = delta.usage.cached_tokens

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


@dataclass
class _Outcome:
    """What the accounting hooks see at the end of a request."""

    status: int = 200
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    completion_text: str | None = None
    answer: dict[str, Any] | None = None
    completed: bool = False


# --- conversions ------------------------------------------------------------------------------------
def _chat_logprobs(items: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=lp.token,
                logprob=lp.logprob,
                bytes=list(lp.bytes),
                top_logprobs=[TopLogprob(token=t, logprob=v, bytes=list(b)) for t, v, b in lp.top],
            )
            for lp in items
        ]
    )


def _completion_logprobs(items: list[TokenLogprob] | tuple[TokenLogprob, ...], offset: int) -> CompletionLogprobs:
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for lp in items:
        tokens.append(lp.token)
        values.append(lp.logprob)
        tops.append({t: v for t, v, _ in lp.top} if lp.top else None)
        offsets.append(offset)
        offset += len(lp.token)
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)


def _usage(plan: Plan, choices: list[_Choice], reasoning_tokens: int) -> UsageInfo:
    # NOTE: each prompt counts once, however many choices (n) continue it.
    firsts = [c for c in choices if c.index % plan.n == 0]
    prompt = sum(len(p.token_ids) for p in plan.prompts)
    cached = sum(c.cached_tokens for c in firsts)
    completion = sum(c.completion_tokens for c in choices)
    return UsageInfo.build(prompt, completion, min(cached, prompt), reasoning_tokens)


def _cache_key(plan: Plan, owner: int | None) -> str:
    """The response-cache key of a plan; `owner` (the API key id under `DS_RESPONSE_CACHE_SCOPE=key`)
    is part of it, so one key's answers are never served to another."""
    material = {
        "owner": None if owner is None else str(owner),
        "endpoint": plan.endpoint,
        "model": plan.model,
        "prompts": [p.token_ids for p in plan.prompts],
        "n": plan.n,
        "echo": plan.echo,
        "reasoning": [plan.split_reasoning, plan.reasoning_prefilled],
        "params": asdict(plan.params),
    }
    return "resp:" + hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()


# --- the flow ---------------------------------------------------------------------------------------
class _Run:
    """One request's trip through the hooks; `finish()` runs exactly once."""

    def __init__(self, services: Services, principal: Principal, plan: Plan) -> None:
        self.services = services
        self.principal = principal
        self.plan = plan
        self.decision: RateLimitDecision | None = None
        self.choices: list[_Choice] = []
        self.outcome = _Outcome()
        self.cache_key: str | None = None  # set for a cacheable stream: stored once it completes
        self.started = time.monotonic()
        self._finished = False

    @property
    def headers(self) -> dict[str, str]:
        return self.decision.headers() if self.decision is not None else {}

    def reserve_tokens(self) -> int:
        engine = self.services.engine
        max_len = engine.model_info.max_model_len
        total = 0
        for prompt in self.plan.prompts:
            budget = self.plan.params.max_tokens
            if budget is None:
                budget = min(self.services.settings.default_max_tokens, max_len - len(prompt.token_ids))
                budget = max(budget, 0)
            total += len(prompt.token_ids) + budget * self.plan.n
        return total

    async def admit(self) -> None:
        limiter = self.services.limiter
        if limiter is None:
            return
        decision = await limiter.admit(self.principal, self.reserve_tokens())
        if not decision.allowed:
            self.reject("rate_limited")
            raise RateLimitError(
                "Rate limit reached for requests or tokens. Retry after the indicated time.",
                decision.retry_after_s,
                headers=decision.headers(),
            )
        self.decision = decision

    def reject(self, reason: str) -> None:
        if self.services.metrics is not None:
            self.services.metrics.rejected(reason)

    async def submit(self) -> None:
        engine = self.services.engine
        try:
            for p_index, prompt in enumerate(self.plan.prompts):
                for i in range(self.plan.n):
                    index = p_index * self.plan.n + i
                    params = self.plan.params
                    if params.seed is not None and index:
                        params = replace(params, seed=params.seed + index)  # distinct reproducible choices
                    stream = await engine.add_request(
                        GenerationRequest(
                            request_id=f"{self.plan.completion_id}-{index}",
                            prompt=prompt.text,
                            prompt_token_ids=prompt.token_ids,
                            params=params,
                            deadline_s=self.services.settings.request_timeout_s,
                            affinity=self.plan.conversation_id,
                        )
                    )
                    splitter = ReasoningSplitter(self.plan.reasoning_prefilled) if self.plan.split_reasoning else None
                    tool_stream = ToolStream(self.plan.tools) if self.plan.tools is not None else None
                    self.choices.append(_Choice(index, p_index, stream, splitter, tool_stream))
        except EngineError as exc:
            await self.close_streams()
            if isinstance(exc, QueueFullError):
                self.reject("queue_full")
            err = from_engine_error(exc)
            self.outcome.status = err.status
            await self.finish()
            raise

    async def close_streams(self) -> None:
        for choice in self.choices:
            await choice.stream.aclose()

    def summarize(self) -> None:
        """Fill the outcome from the choices (after collection or when a stream ends)."""
        out = self.outcome
        if not self.choices:
            return
        reasons = [c.finish_reason for c in self.choices]
        out.finish_reason = next((r for r in reasons if r in ("timeout", "error", "abort")), reasons[0])
        out.prompt_tokens = self.plan.num_prompt_tokens
        out.completion_tokens = sum(c.completion_tokens for c in self.choices)
        out.cached_tokens = min(
            sum(c.cached_tokens for c in self.choices if c.index % self.plan.n == 0), out.prompt_tokens
        )
        first = self.choices[0]
        if first.splitter is not None:
            out.reasoning_tokens = sum(self._reasoning_tokens(c) for c in self.choices)
            out.answer = {
                "role": "assistant",
                "content": first.splitter.content_text,
                "reasoning_content": first.splitter.reasoning_text or None,
            }
            out.completion_text = first.splitter.content_text
        else:
            out.completion_text = first.text
            out.answer = {"role": "assistant", "content": first.text}

    def _reasoning_tokens(self, choice: _Choice) -> int:
        if choice.splitter is None or not choice.splitter.reasoning_text:
            return 0
        # NOTE: re-tokenized reasoning text plus the two tags; exact for the usual tokenizers.
        n = len(self.services.engine.tokenize(choice.splitter.reasoning_text, add_special_tokens=False)) + 2
        return min(n, choice.completion_tokens)

    async def finish(self) -> None:
        """Accounting hooks; runs once, also when the client went away (shielded from cancellation)."""
        if self._finished:
            return
        self._finished = True
        services, out = self.services, self.outcome
        with anyio.CancelScope(shield=True):
            await self.close_streams()
            if self.decision is not None and services.limiter is not None:
                try:
                    await services.limiter.settle(
                        self.principal, self.decision, out.prompt_tokens + out.completion_tokens
                    )
                except Exception:
                    logger.exception("limiter.settle failed")
            if (
                out.completed
                and self.plan.conversation_id
                and services.conversations is not None
                and out.answer is not None
            ):
                try:
                    await services.conversations.append_turn(
                        self.principal,
                        self.plan.conversation_id,
                        list(self.plan.conversation_messages),
                        out.answer,
                        out.prompt_tokens,
                        out.completion_tokens,
                    )
                except Exception:
                    logger.exception("conversations.append_turn failed")
        first = self.choices[0] if self.choices else None
        timings = first.timings if first is not None else None
        if services.usage is not None:
            store = services.settings.store_content
            services.usage.record(
                UsageEvent(
                    request_id=self.plan.completion_id,
                    key_id=self.principal.key_id,
                    model=self.plan.model,
                    endpoint=self.plan.endpoint,
                    status=out.status,
                    finish_reason=out.finish_reason,
                    prompt_tokens=out.prompt_tokens,
                    completion_tokens=out.completion_tokens,
                    cached_tokens=out.cached_tokens,
                    reasoning_tokens=out.reasoning_tokens,
                    queue_ms=None if timings is None else timings.queue_s * 1000,
                    first_token_ms=None
                    if timings is None or timings.first_token_s is None
                    else timings.first_token_s * 1000,
                    total_ms=(time.monotonic() - self.started) * 1000,
                    prompt_text="\n".join(p.text for p in self.plan.prompts) if store else None,
                    completion_text=out.completion_text if store else None,
                    created_at=time.time(),
                )
            )
            if services.settings.usage_sync_timeout_s > 0:
                # the client's success (its last byte) comes after the record is durable
                with anyio.CancelScope(shield=True):
                    await services.usage.persisted(services.settings.usage_sync_timeout_s)
        if services.metrics is not None and self.choices:
            if out.finish_reason == "timeout":
                services.metrics.rejected("timeout")
            arrivals = first.arrivals if first is not None else []
            services.metrics.observe_request(
                endpoint=self.plan.endpoint,
                finish_reason=out.finish_reason,
                prompt_tokens=out.prompt_tokens,
                completion_tokens=out.completion_tokens,
                cached_tokens=out.cached_tokens,
                queue_s=None if timings is None else timings.queue_s,
                ttft_s=None if timings is None else timings.first_token_s,
                e2e_s=time.monotonic() - self.started,
                itl_s=[b - a for a, b in itertools.pairwise(arrivals)],
            )
        bind_log_fields(tokens=out.prompt_tokens + out.completion_tokens)
        logger.info(
            "%s %s finished: %s, %d prompt + %d completion tokens (%d cached), status %d",
            self.plan.endpoint,
            self.plan.completion_id,
            out.finish_reason,
            out.prompt_tokens,
            out.completion_tokens,
            out.cached_tokens,
            out.status,
        )


async def run_plan(request: Request, services: Services, principal: Principal, plan: Plan) -> Response:
    """Serve a planned generation as a JSON body or an SSE stream (see the module docstring)."""
    check_plan(services, plan)
    run = _Run(services, principal, plan)
    await run.admit()
    cache = services.response_cache
    cache_key: str | None = None
    if cache is not None and services.settings.response_cache and plan.use_cache and plan.params.is_deterministic:
        owner = principal.key_id if services.settings.response_cache_scope == "key" else None
        cache_key = _cache_key(plan, owner)
        hit = _cache_hit(plan, await _cache_get(cache, cache_key))
        if services.metrics is not None:
            services.metrics.response_cache(hit is not None)
        if hit is not None:
            _account_cached(run, hit)
            await run.finish()  # usage record, limiter settle and the conversation turn, as for a miss
            headers = {**run.headers, "x-cache": "hit"}
            if plan.stream:
                events = cached.replay_sse(hit, plan.include_usage)
                return StreamingResponse(
                    _replay(events), media_type="text/event-stream", headers={**_SSE_HEADERS, **headers}
                )
            return Response(orjson.dumps(hit), media_type="application/json", headers=headers)
    try:
        await run.submit()
    except EngineError as exc:
        if isinstance(exc, ContextLengthError) and plan.endpoint == "completions" and exc.param == "messages":
            exc.param = "prompt"
        err = from_engine_error(exc)
        err.headers = {**run.headers, **err.headers}  # x-ratelimit-* on errors after admission too
        raise err from exc
    if plan.stream:
        run.cache_key = cache_key
        headers = {**_SSE_HEADERS, **run.headers}
        if cache_key is not None:
            headers["x-cache"] = "miss"
        return StreamingResponse(
            _sse(run, services.settings.keepalive_interval_s), media_type="text/event-stream", headers=headers
        )
    try:
        await _collect(request, run)
        body = _render_body(run)
        run.outcome.completed = True
    except ApiError as err:
        run.outcome.status = err.status
        err.headers = {**run.headers, **err.headers}
        raise
    finally:
        await run.finish()
    headers = run.headers
    if cache_key is not None and cache is not None:
        headers["x-cache"] = "miss"
        if run.outcome.finish_reason in ("stop", "length"):
            await _cache_put(cache, cache_key, body)
    return Response(body, media_type="application/json", headers=headers)


async def _cache_get(cache: Any, key: str) -> bytes | None:
    try:
        value: bytes | None = await cache.get(key)
        return value
    except Exception:
        logger.warning("response cache get failed", exc_info=True)
        return None


async def _cache_put(cache: Any, key: str, body: bytes) -> None:
    try:
        await cache.put(key, body)
    except Exception:
        logger.warning("response cache put failed", exc_info=True)


def _cache_hit(plan: Plan, stored: bytes | None) -> dict[str, Any] | None:
    """A stored body re-issued for this request; None (a miss) when absent or unreadable."""
    if stored is None:
        return None
    try:
        return cached.hit_body(stored, plan.completion_id, plan.created)
    except (ValueError, TypeError, KeyError):
        logger.warning("unreadable response cache entry ignored")
        return None


async def _replay(events: list[bytes]) -> AsyncIterator[bytes]:
    for event in events:
        yield event


def _account_cached(run: _Run, body: dict[str, Any]) -> None:
    """Fill the outcome of a hit the way a finished miss fills it: token counts for usage and the
    limiter, the first choice's text as the answer stored in the conversation."""
    usage = body.get("usage") or {}
    out = run.outcome
    out.finish_reason = "cache_hit"
    out.prompt_tokens = int(usage.get("prompt_tokens", 0))
    out.completion_tokens = int(usage.get("completion_tokens", 0))
    out.cached_tokens = out.prompt_tokens
    details = usage.get("completion_tokens_details") or {}
    out.reasoning_tokens = int(details.get("reasoning_tokens", 0))
    choices = body.get("choices") or [{}]
    first = choices[0] if isinstance(choices[0], dict) else {}
    if run.plan.endpoint == "chat.completions":
        message = first.get("message") or {}
        content = message.get("content") or ""
        out.answer = {
            "role": "assistant",
            "content": content,
            "reasoning_content": message.get("reasoning_content") or None,
        }
    else:
        content = first.get("text") or ""
        out.answer = {"role": "assistant", "content": content}
    out.completion_text = content
    out.completed = True


# --- JSON body --------------------------------------------------------------------------------------
async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect(request: Request, run: _Run) -> None:
    async def drain(choice: _Choice) -> None:
        async for delta in choice.stream:
            choice.absorb(delta)

    tasks = [asyncio.ensure_future(drain(c)) for c in run.choices]
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        pending: set[asyncio.Future[None]] = set(tasks)
        while pending:
            done, _ = await asyncio.wait(pending | {watcher}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                run.outcome.status = 499  # client closed the request (nginx's code); nobody reads the body
                raise ApiError(499, "client disconnected", "invalid_request_error")
            pending -= done
            for task in done:
                task.result()
    finally:
        watcher.cancel()
        for task in tasks:
            task.cancel()
        await run.close_streams()
    run.summarize()
    _raise_for_failure(run)


def _raise_for_failure(run: _Run) -> None:
    reason = run.outcome.finish_reason
    errors = [c.error for c in run.choices if c.error]
    if reason == "timeout":
        run.outcome.status = 504
        raise from_engine_error(
            DeadlineExceededError(
                f"The request timed out after {run.services.settings.request_timeout_s:g}s and was aborted."
            )
        )
    if reason == "abort":
        run.outcome.status = 503
        raise ServiceUnavailableError(
            "The request was aborted because the server is shutting down.", code="engine_unavailable", retry_after_s=5.0
        )
    if reason == "error":
        run.outcome.status = 500
        logger.error("generation failed: %s", errors[0] if errors else "unknown")
        raise ApiError(
            500, "The server had an error while generating the response.", "server_error", None, "internal_error"
        )


def _render_body(run: _Run) -> bytes:
    plan, out = run.plan, run.outcome
    if plan.endpoint == "chat.completions":
        choices = []
        for c in run.choices:
            if c.splitter is not None:
                if not plan.stream:  # NOTE: a stream has fed its splitters already
                    c.splitter.push(c.text)
                    c.splitter.flush()
                message = AssistantMessage(
                    content=c.splitter.content_text, reasoning_content=c.splitter.reasoning_text or None
                )
            else:
                message = AssistantMessage(content=c.text)
            finish_reason = c.finish_reason
            if plan.tools is not None and message.content:
                content, calls = parse_tool_calls(message.content, plan.tools)
                if calls:
                    message = AssistantMessage(
                        content=content or None, reasoning_content=message.reasoning_content, tool_calls=calls
                    )
                    finish_reason = "tool_calls"
            logprobs = _chat_logprobs(c.logprobs) if plan.params.logprobs else None
            choices.append(ChatChoice(index=c.index, message=message, logprobs=logprobs, finish_reason=finish_reason))
        run.summarize()  # again: the splitters now hold the final split
        usage = _usage(plan, run.choices, out.reasoning_tokens)
        body: ChatCompletion | Completion = ChatCompletion(
            id=plan.completion_id, created=plan.created, model=plan.model, choices=choices, usage=usage
        )
    else:
        comp_choices = []
        for c in run.choices:
            prefix = plan.prompts[c.prompt_index].text if plan.echo else ""
            comp_logprobs = _completion_logprobs(c.logprobs, len(prefix)) if plan.params.logprobs else None
            comp_choices.append(
                CompletionChoice(
                    index=c.index, text=prefix + c.text, logprobs=comp_logprobs, finish_reason=c.finish_reason
                )
            )
        body = Completion(
            id=plan.completion_id,
            created=plan.created,
            model=plan.model,
            choices=comp_choices,
            usage=_usage(plan, run.choices, 0),
        )
    return body.model_dump_json().encode()


# --- SSE --------------------------------------------------------------------------------------------
async def _pump(choice: _Choice, queue: asyncio.Queue[tuple[_Choice, StreamDelta | BaseException]]) -> None:
    try:
        async for delta in choice.stream:
            queue.put_nowait((choice, delta))
    except Exception as exc:
        queue.put_nowait((choice, exc))


async def _sse(run: _Run, keepalive_s: float) -> AsyncIterator[bytes]:
    plan = run.plan
    chat = plan.endpoint == "chat.completions"
    chunk = _chat_chunk if chat else _completion_chunk
    queue: asyncio.Queue[tuple[_Choice, StreamDelta | BaseException]] = asyncio.Queue()
    pumps = [asyncio.ensure_future(_pump(c, queue)) for c in run.choices]
    remaining = len(run.choices)
    failed = False
    try:
        for c in run.choices:
            if chat:
                yield model_event(
                    ChatCompletionChunk(
                        id=plan.completion_id,
                        created=plan.created,
                        model=plan.model,
                        choices=[ChatChunkChoice(index=c.index, delta=ChatDelta(role="assistant", content=""))],
                    )
                )
            elif plan.echo:
                yield model_event(
                    Completion(
                        id=plan.completion_id,
                        created=plan.created,
                        model=plan.model,
                        choices=[
                            CompletionChoice(index=c.index, finish_reason=None, text=plan.prompts[c.prompt_index].text)
                        ],
                    )
                )
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
                    yield _KEEPALIVE
                    continue
            if isinstance(item, BaseException):
                raise item
            choice.absorb(item)
            if item.finished:
                remaining -= 1
                if item.finish_reason in ("timeout", "error", "abort"):
                    failed = True
                    run.summarize()
                    yield _error_event(run, item)
                    break
            event = chunk(run, choice, item)
            if event is not None:
                yield event
        if not failed:
            run.summarize()
            run.outcome.completed = True
            cache = run.services.response_cache
            if (
                run.cache_key is not None
                and cache is not None
                and all(c.finish_reason in ("stop", "length") for c in run.choices)
            ):
                await _cache_put(cache, run.cache_key, _render_body(run))
            if plan.include_usage:
                usage = _usage(plan, run.choices, run.outcome.reasoning_tokens)
                if chat:
                    yield model_event(
                        ChatCompletionChunk(
                            id=plan.completion_id, created=plan.created, model=plan.model, choices=[], usage=usage
                        )
                    )
                else:
                    yield model_event(
                        Completion(
                            id=plan.completion_id, created=plan.created, model=plan.model, choices=[], usage=usage
                        )
                    )
            await run.finish()  # accounting (the usage record durable) before the client sees [DONE]
        yield DONE
    finally:
        for task in pumps:
            task.cancel()
        if not run.outcome.completed and not failed:
            run.summarize()
            run.outcome.finish_reason = "abort"  # the client went away mid-stream
        await run.finish()


def _error_event(run: _Run, delta: StreamDelta) -> bytes:
    if delta.finish_reason == "timeout":
        err = from_engine_error(
            DeadlineExceededError(
                f"The request timed out after {run.services.settings.request_timeout_s:g}s and was aborted."
            )
        )
    elif delta.finish_reason == "abort":
        err = ServiceUnavailableError(
            "The request was aborted because the server is shutting down.", code="engine_unavailable"
        )
    else:
        logger.error("generation failed mid-stream: %s", delta.error)
        err = ApiError(
            500, "The server had an error while generating the response.", "server_error", None, "internal_error"
        )
    return sse_event(orjson.dumps(err.body()))


def _chat_chunk(run: _Run, choice: _Choice, delta: StreamDelta) -> bytes | None:
    plan = run.plan
    text = delta.text
    reasoning = ""
    if choice.splitter is not None:
        split = choice.splitter.push(text)
        if delta.finished:
            tail = choice.splitter.flush()
            split = type(split)(split.reasoning + tail.reasoning, split.content + tail.content)
        reasoning, text = split.reasoning, split.content
    calls: list[ToolCall] = []
    if choice.tool_stream is not None:
        text = choice.tool_stream.push(text)
        if delta.finished:
            rest, calls = choice.tool_stream.finish()
            text += rest
    logprobs = _chat_logprobs(delta.logprobs) if plan.params.logprobs and delta.logprobs else None
    if not text and not reasoning and logprobs is None and not delta.finished:
        return None  # a tag being held back
    finish_reason = delta.finish_reason if delta.finished else None
    body = ChatCompletionChunk(
        id=plan.completion_id,
        created=plan.created,
        model=plan.model,
        choices=[
            ChatChunkChoice(
                index=choice.index,
                delta=ChatDelta(content=text or None if reasoning else text, reasoning_content=reasoning or None),
                logprobs=logprobs,
                finish_reason=None if calls else finish_reason,
            )
        ],
    )
    if not calls:
        return model_event(body)
    events = [model_event(body)] if text or reasoning or logprobs is not None else []
    events.extend(_tool_call_events(run, choice.index, calls))
    return b"".join(events)


TOOL_ARGUMENT_PIECE = 32  # characters of `arguments` per streamed delta


def _tool_call_events(run: _Run, index: int, calls: list[ToolCall]) -> list[bytes]:
    """Tool calls as OpenAI streams them: per call, index + id + name first, then the arguments in
    pieces; then an empty delta with finish_reason "tool_calls"."""
    plan = run.plan

    def event(delta: ChatDelta, finish_reason: str | None = None) -> bytes:
        return model_event(
            ChatCompletionChunk(
                id=plan.completion_id,
                created=plan.created,
                model=plan.model,
                choices=[ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason)],
            )
        )

    events = []
    for i, call in enumerate(calls):
        events.append(
            event(
                ChatDelta(
                    tool_calls=[
                        ToolCallDelta(
                            index=i,
                            id=call.id,
                            type="function",
                            function=FunctionCallDelta(name=call.function.name, arguments=""),
                        )
                    ]
                )
            )
        )
        args = call.function.arguments
        for start in range(0, len(args), TOOL_ARGUMENT_PIECE):
            piece = args[start : start + TOOL_ARGUMENT_PIECE]
            events.append(
                event(ChatDelta(tool_calls=[ToolCallDelta(index=i, function=FunctionCallDelta(arguments=piece))]))
            )
    events.append(event(ChatDelta(), "tool_calls"))
    return events


def _completion_chunk(run: _Run, choice: _Choice, delta: StreamDelta) -> bytes | None:
    plan = run.plan
    if not delta.text and not delta.finished and not delta.logprobs:
        return None
    logprobs: CompletionLogprobs | None = None
    if plan.params.logprobs and delta.logprobs:
        offset = len(plan.prompts[choice.prompt_index].text) if plan.echo else 0
        offset += len(choice.text) - len(delta.text)
        logprobs = _completion_logprobs(delta.logprobs, offset)
    body = Completion(
        id=plan.completion_id,
        created=plan.created,
        model=plan.model,
        choices=[
            CompletionChoice(
                index=choice.index,
                text=delta.text,
                logprobs=logprobs,
                finish_reason=delta.finish_reason if delta.finished else None,
            )
        ],
    )
    return model_event(body)


# --- route helpers ---------------------------------------------------------------------------------
def _invalid(param: str, why: str) -> ApiError:
    return ApiError(400, f"Invalid value for '{param}': {why}", "invalid_request_error", param, "invalid_value")


def check_body(services: Services, body: Any, num_prompts: int = 1, num_messages: int = 0) -> None:
    """Limits a body must keep before any templating or tokenizing: choices (n x prompts), messages,
    number and length of stop strings. Raises a 400 naming the field."""
    settings = services.settings
    if num_messages > settings.max_messages:
        raise _invalid(
            "messages",
            f"{num_messages} messages; at most {settings.max_messages} are allowed "
            "(stored conversation history included)",
        )
    choices = body.n * num_prompts
    if choices > settings.max_choices:
        raise _invalid("n", f"n x prompts = {choices} choices; at most {settings.max_choices} are allowed")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
    if len(stop) > settings.max_stop_sequences:
        raise _invalid("stop", f"at most {settings.max_stop_sequences} stop sequences are allowed")
    for text in stop:
        if len(text) > settings.max_stop_chars:
            raise _invalid(
                "stop", f"a stop sequence has {len(text)} characters; at most {settings.max_stop_chars} are allowed"
            )


def check_plan(services: Services, plan: Plan) -> None:
    """What only the engine knows (sampling values, token ids, top_k and logit_bias within the
    vocabulary), checked before the rate limiter or the response cache see the request. Prompt +
    max_tokens against the context is checked by `add_request`, after admission, so that refusal
    carries the rate-limit headers; the schema bounds max_tokens, so the reservation stays finite."""
    choices = plan.n * len(plan.prompts)
    if choices > services.settings.max_choices:
        raise _invalid("n", f"n x prompts = {choices} choices; at most {services.settings.max_choices} are allowed")
    for prompt in plan.prompts:
        services.engine.check_request(plan.params, prompt.token_ids, context=False)


def _logit_bias(raw: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    if not raw:
        return ()
    out: list[tuple[int, float]] = []
    for key, bias in raw.items():
        key = key.strip()
        if not key.isascii() or not key.isdigit() or len(key) > 10:
            raise _invalid("logit_bias", f"the key {key[:32]!r} is not a token id")
        out.append((int(key), float(bias)))
    return tuple(sorted(out))


def sampling_params(
    body: Any, max_tokens: int | None, logprobs: bool, top_logprobs: int, defaults: SamplingDefaults | None = None
) -> SamplingParams:
    """Map the OpenAI body fields (plus extensions) to `SamplingParams`; what the body leaves open
    takes the model's recommended sampling (`defaults`)."""
    stop: tuple[str, ...] = ()
    if isinstance(body.stop, str):
        stop = (body.stop,)
    elif body.stop:
        stop = tuple(body.stop)
    picked = (defaults or SamplingDefaults()).fill(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
    )
    return SamplingParams(
        max_tokens=max_tokens,
        **picked,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        seed=body.seed,
        stop=stop,
        ignore_eos=bool(body.ignore_eos),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        min_tokens=body.min_tokens or 0,
        logit_bias=_logit_bias(getattr(body, "logit_bias", None)),
    )


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
