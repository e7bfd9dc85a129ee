"""GatewayEngine: an `AsyncEngine` whose tokens come from upstream servers instead of a local model.

The request path (`serving/`: keys, limits, response cache, conversations, usage, metrics)
runs unchanged on top of it. The gateway keeps only the model's tokenizer and chat template (read
with llama.cpp's `vocab_only`: no weights, no KV cache), so prompts are rendered and counted here
and sent as token ids to `<upstream>/v1/completions` (streaming). Every upstream behind one
gateway must therefore use the gateway's tokenizer: the same model, in any format or quantization.

Per request: validate the context length, let the pool pick an upstream (routing policy) and open
the stream; a pump task turns upstream SSE chunks into `StreamDelta`s as they arrive (no
buffering). A failure before the first token re-opens the request on another upstream; after it,
the stream ends with finish reason "error". Closing the `RequestStream` (client gone) cancels the
pump, which closes the upstream connection, which aborts the request there.

Upstream chunks carry text, not token ids: each text chunk counts as one token (`token_ids` holds a
placeholder) until the final usage chunk gives the exact completion count. Logprobs come back in
the completions API's form (tokens as text, at most 5 alternatives per token).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from deepseek_serve.engine.async_engine import AsyncEngine, RequestStream
from deepseek_serve.engine.chat_template import ChatTemplate
from deepseek_serve.engine.errors import EngineStoppedError, InvalidRequestError
from deepseek_serve.engine.llm_engine import check_request, check_token_ids
from deepseek_serve.engine.runners import Tokenizer
from deepseek_serve.engine.types import (
    EngineStats,
    GenerationRequest,
    ModelInfo,
    RequestTimings,
    SamplingParams,
    StreamDelta,
    TokenLogprob,
    Usage,
)
from deepseek_serve.gateway.http import HttpError, Response
from deepseek_serve.gateway.pool import UpstreamFailure, UpstreamPool
from deepseek_serve.gateway.upstreams import Upstream, UpstreamSource

if TYPE_CHECKING:
    from deepseek_serve.config import Settings

logger = logging.getLogger(__name__)

_PLACEHOLDER = (0,)
_MAX_EVENT_BYTES = 1024 * 1024
_FINISH = {"stop": "stop", "length": "length"}


class GatewayEngine(AsyncEngine):
    """Routes generation requests over `UpstreamPool`; the rest of `AsyncEngine`'s surface
    (tokenize, render_chat, stats, probe) is answered locally."""

    def __init__(
        self,
        settings: Settings,
        tokenizer: Tokenizer,
        template: ChatTemplate | None,
        model_info: ModelInfo,
        default_system_prompt: str | None = None,
    ) -> None:
        # no super().__init__(): there is no local scheduler core or worker thread.
        self._settings = settings
        self._tokenizer = tokenizer
        self._template = template
        self._default_system = default_system_prompt
        self.model_info = model_info
        self._streams: dict[str, RequestStream] = {}
        self._pumps: dict[str, asyncio.Task[None]] = {}
        self._accepting = False
        self.pool = UpstreamPool(
            UpstreamSource(settings.upstreams),
            secret=settings.engine_secret,
            health_interval_s=settings.gateway_health_interval_s,
            connect_timeout_s=settings.gateway_connect_timeout_s,
            header_timeout_s=settings.gateway_header_timeout_s,
            eject_failures=settings.gateway_eject_failures,
            eject_s=settings.gateway_eject_s,
            busy_margin=settings.gateway_busy_margin,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> GatewayEngine:
        """The tokenizer and chat template of `DS_MODEL`; no weights are loaded."""
        return load_gateway_engine(settings)

    # --- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._accepting:
            return
        await self.pool.start()
        self._accepting = True

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        self._accepting = False
        deadline = time.monotonic() + drain_timeout_s
        while self._pumps and time.monotonic() < deadline:  # noqa: ASYNC110 - polls pump tasks
            await asyncio.sleep(0.05)
        for task in list(self._pumps.values()):
            task.cancel()
        if self._pumps:
            await asyncio.gather(*self._pumps.values(), return_exceptions=True)
        await self.pool.close()

    # --- requests ----------------------------------------------------------------------------------
    async def add_request(self, request: GenerationRequest) -> RequestStream:
        """Validate, pick an upstream and open the stream there (headers read); raises the engine's
        errors before any streaming: InvalidRequest/ContextLength, QueueFull (every upstream tried
        was full), EngineStopped (none available)."""
        if not self._accepting:
            raise EngineStoppedError("the gateway is not accepting requests (starting or shutting down)")
        if request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
        elif request.prompt is not None:
            ids = self.tokenize(request.prompt, request.add_special_tokens)
        else:
            raise InvalidRequestError("either prompt or prompt_token_ids is required", param="prompt")
        max_tokens = self.check_request(request.params, ids)
        body = _completion_body(self.model_info.id, ids, max_tokens, request)
        timeout = request.deadline_s if request.deadline_s is not None else self._settings.request_timeout_s
        job = _Job(request, body, request.prompt or "", ids, time.monotonic(), timeout)
        up, response = await self.pool.open(body, job.route_text, ids, request.affinity, job.tried, self._attempts)
        stream = RequestStream(self, request.request_id, len(ids))
        self._streams[request.request_id] = stream
        self._pumps[request.request_id] = asyncio.create_task(
            self._pump(stream, job, up, response), name=f"gateway-{request.request_id}"
        )
        return stream

    @property
    def _attempts(self) -> int:
        return 1 + self._settings.gateway_retries

    def abort(self, request_id: str) -> None:
        task = self._pumps.get(request_id)
        if task is not None:
            task.cancel()

    async def _pump(self, stream: RequestStream, job: _Job, up: Upstream, response: Response) -> None:
        request_id = job.request.request_id
        try:
            async with asyncio.timeout(max(job.deadline - time.monotonic(), 0.0)):
                while True:
                    try:
                        await self._relay(stream, job, up, response)
                        up.served_total += 1
                        up.success()
                        return
                    except UpstreamFailure as exc:
                        self.pool.failed(up, exc)
                        if job.tokens:
                            logger.warning("upstream %s failed mid-stream for %s: %s", up.name, request_id, exc)
                            stream._put(job.final("error", f"upstream {up.name} failed mid-stream: {exc}"))
                            return
                        logger.warning(
                            "upstream %s failed before the first token of %s (%s); retrying", up.name, request_id, exc
                        )
                    finally:
                        await response.aclose()
                        self.pool.release(up)
                    try:
                        job.opened = time.monotonic()
                        up, response = await self.pool.open(
                            job.body,
                            job.route_text,
                            job.body["prompt"],
                            job.request.affinity,
                            job.tried,
                            self._attempts - len(job.tried),
                        )
                    except (EngineStoppedError, InvalidRequestError) as exc:
                        stream._put(job.final("error", str(exc)))
                        return
                    except Exception as exc:  # QueueFullError: every other upstream is full
                        stream._put(job.final("error", str(exc) or type(exc).__name__))
                        return
        except TimeoutError:
            stream._put(job.final("timeout", "the request deadline passed"))
        except asyncio.CancelledError:
            pass
        finally:
            stream.scheduled.set()
            self._pumps.pop(request_id, None)
            self._streams.pop(request_id, None)

    async def _relay(self, stream: RequestStream, job: _Job, up: Upstream, response: Response) -> None:
        """Forward one upstream stream; raises UpstreamFailure when it breaks off."""
        finish: str | None = None
        usage: dict[str, Any] | None = None
        try:
            async for data in _sse_data(response):
                if data == b"[DONE]":
                    # no break: reading on to the end of the body lets the connection go back to
                    # the pool (a response closed early closes its connection: a new one per request).
                    continue
                try:
                    event = orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise UpstreamFailure("unreadable stream event") from None
                if not isinstance(event, dict):
                    continue
                if "error" in event:
                    err = event["error"]
                    message = err.get("message") if isinstance(err, dict) else str(err)
                    raise UpstreamFailure(f"error event: {message}")
                if isinstance(event.get("usage"), dict):
                    usage = event["usage"]
                for choice in event.get("choices") or ():
                    text = choice.get("text") or ""
                    logprobs = _logprobs(choice.get("logprobs")) if job.request.params.logprobs else None
                    reason = choice.get("finish_reason")
                    if text or logprobs:
                        if not job.tokens:
                            job.first_token = time.monotonic()
                            up.observe_first_token(job.first_token - job.opened)
                            stream.scheduled.set()
                            self.pool.router.observe(job.route_text, job.request.affinity, up.name)
                        job.tokens += 1
                        token_ids = _PLACEHOLDER * len(logprobs) if logprobs else _PLACEHOLDER
                        stream._put(StreamDelta(text=text, token_ids=token_ids, logprobs=logprobs))
                    if reason:
                        finish = reason
        except HttpError as exc:
            raise UpstreamFailure(f"stream broke off ({exc})") from None
        if finish is None:
            raise UpstreamFailure("stream ended without a finish reason")
        if not job.tokens:
            self.pool.router.observe(job.route_text, job.request.affinity, up.name)
        stream._put(
            job.final(_FINISH.get(finish, "error"), None if finish in _FINISH else f"upstream: {finish}", usage)
        )

    # --- local answers -----------------------------------------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        ids = list(token_ids)
        check_token_ids(ids, self._tokenizer.vocab_size)
        return self._tokenizer.decode(ids)

    def check_request(self, params: SamplingParams, prompt_token_ids: Sequence[int], context: bool = True) -> int:
        """The engine's own checks against the model the gateway tokenizes with; constrained decoding
        is refused, since upstreams are reached through the plain completions API."""
        if params.grammar is not None:
            raise InvalidRequestError(
                "The gateway does not forward constrained decoding (response_format "
                "json_object/json_schema, forced tool calls) to its upstreams yet; "
                "call an engine with the llamacpp runner directly for it.",
                param="response_format",
            )
        return check_request(
            params,
            list(prompt_token_ids),
            vocab_size=self._tokenizer.vocab_size,
            max_model_len=self.model_info.max_model_len,
            default_max_tokens=self._settings.default_max_tokens,
            context=context,
        )

    def tokenizer_bos_or_first(self) -> int:
        ids = self._tokenizer.encode("Hi", add_special_tokens=True)
        return ids[0] if ids else 0

    async def probe(self, timeout_s: float = 10.0) -> bool:
        return bool(self.pool.available())

    async def clear_prefix_cache(self) -> None:
        return None

    def prefix_cache_summary(self) -> str:
        return ""

    def stats(self) -> EngineStats:
        """The pool as one engine: sums over the available upstreams' last load reports. The gateway
        counts as stepping while an upstream is available (readiness then answers without a probe)."""
        ups = self.pool.available()
        reports = [u.report for u in ups]

        def total(key: str) -> int:
            return sum(int(r.get(key, 0) or 0) for r in reports)

        running = sum(max(int(u.report.get("running", 0) or 0), u.inflight) for u in ups)
        return EngineStats(
            num_running=running,
            num_waiting=total("waiting"),
            max_batch_size=sum(u.capacity for u in ups),
            max_queue_size=total("max_queue_size"),
            kv_capacity_tokens=total("kv_capacity_tokens"),
            kv_used_tokens=total("kv_used_tokens"),
            last_step_monotonic=time.monotonic() if ups else 0.0,
            steps_total=0,
            prompt_tokens_total=0,
            generation_tokens_total=0,
            prefix_cache_queries_tokens_total=0,
            prefix_cache_hits_tokens_total=0,
            is_running=self._accepting and bool(ups),
            kv_cached_tokens=total("kv_cached_tokens"),
        )

    def upstreams_state(self) -> list[dict[str, Any]]:
        return [u.snapshot() for u in self.pool.upstreams.values()]


class _Job:
    """One request's progress across upstream attempts."""

    def __init__(
        self,
        request: GenerationRequest,
        body: dict[str, Any],
        route_text: str,
        ids: list[int],
        submitted: float,
        timeout_s: float,
    ) -> None:
        self.request = request
        self.body = body
        self.route_text = route_text
        self.num_prompt_tokens = len(ids)
        self.submitted = submitted
        self.opened = submitted  # when the current upstream attempt began
        self.deadline = submitted + timeout_s
        self.tried: set[str] = set()
        self.tokens = 0
        self.first_token: float | None = None

    def final(self, reason: Any, error: str | None, usage: dict[str, Any] | None = None) -> StreamDelta:
        completion = self.tokens
        cached = drafted = accepted = 0
        if usage:
            completion = int(usage.get("completion_tokens", completion) or 0)
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict):
                cached = int(details.get("cached_tokens", 0) or 0)
            speculative = usage.get("speculative_tokens")  # this project's engines, when speculation ran
            if isinstance(speculative, dict):
                drafted = int(speculative.get("drafted", 0) or 0)
                accepted = int(speculative.get("accepted", 0) or 0)
        now = time.monotonic()
        first = None if self.first_token is None else self.first_token - self.submitted
        return StreamDelta(
            text="",
            token_ids=(),
            finished=True,
            finish_reason=reason,
            error=error,
            usage=Usage(
                prompt_tokens=self.num_prompt_tokens,
                completion_tokens=completion,
                cached_tokens=min(cached, self.num_prompt_tokens),
                drafted_tokens=drafted,
                accepted_tokens=accepted,
            ),
            timings=RequestTimings(queue_s=0.0, first_token_s=first, total_s=now - self.submitted),
        )


def _completion_body(model: str, ids: list[int], max_tokens: int, request: GenerationRequest) -> dict[str, Any]:
    p = request.params
    body: dict[str, Any] = {
        "model": model,
        "prompt": ids,
        "max_tokens": max_tokens,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if p.seed is not None:
        body["seed"] = p.seed
    if p.stop:
        body["stop"] = list(p.stop)
    if p.presence_penalty:
        body["presence_penalty"] = p.presence_penalty
    if p.frequency_penalty:
        body["frequency_penalty"] = p.frequency_penalty
    # extensions understood by this project's engines, vLLM and llama.cpp's server
    if p.top_k:
        body["top_k"] = p.top_k
    if p.min_p:
        body["min_p"] = p.min_p
    if p.repetition_penalty != 1.0:
        body["repetition_penalty"] = p.repetition_penalty
    if p.ignore_eos:
        body["ignore_eos"] = True
    if p.min_tokens:
        body["min_tokens"] = p.min_tokens
    if p.logprobs:
        body["logprobs"] = min(p.top_logprobs, 5)  # the completions API's limit
    if p.logit_bias:
        body["logit_bias"] = {str(token): bias for token, bias in p.logit_bias}
    if not p.speculative:
        body["speculative"] = False  # this project's engines; others ignore the field
    return body


def _logprobs(raw: Any) -> tuple[TokenLogprob, ...] | None:
    """OpenAI completions logprobs (tokens, token_logprobs, top_logprobs) -> TokenLogprob."""
    if not isinstance(raw, dict) or not raw.get("tokens"):
        return None
    tops = raw.get("top_logprobs") or []
    out = []
    for i, (token, value) in enumerate(zip(raw["tokens"], raw.get("token_logprobs") or [], strict=False)):
        top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        out.append(
            TokenLogprob(
                token_id=0,
                token=str(token),
                logprob=float(value if value is not None else float("-inf")),
                bytes=tuple(str(token).encode()),
                top=tuple((str(t), float(v), tuple(str(t).encode())) for t, v in top.items()),
            )
        )
    return tuple(out)


async def _sse_data(response: Response) -> AsyncIterator[bytes]:
    """The `data:` payloads of a text/event-stream, as they arrive; comments are skipped."""
    buffer = b""
    async for part in response.aiter_raw():
        buffer += part
        while True:
            end = buffer.find(b"\n\n")
            if end < 0:
                if len(buffer) > _MAX_EVENT_BYTES:
                    raise UpstreamFailure("stream event too large")
                break
            event, buffer = buffer[:end], buffer[end + 2 :]
            data = [line[5:].lstrip() for line in event.replace(b"\r", b"").split(b"\n") if line.startswith(b"data:")]
            if data:
                yield b"\n".join(data)


# --- loading ------------------------------------------------------------------------------------------
def load_gateway_engine(settings: Settings) -> GatewayEngine:
    from deepseek_serve.models.resolve import resolve_model

    model = resolve_model(
        settings.model,
        cache_dir=settings.models_dir,
        source=settings.model_source,
        revision=settings.model_revision,
        served_name=settings.served_model_name,
    )
    if model.format == "gguf":
        tokenizer, source, trained = _gguf_vocab(Path(model.path))
    else:
        tokenizer, source, trained = _hf_vocab(Path(model.path))
    if settings.chat_template:
        source = Path(settings.chat_template).read_text()
    template = ChatTemplate(source, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token) if source else None
    limit = settings.max_model_len or trained or settings.context_length
    info = ModelInfo(
        id=model.model_id,
        path=str(model.path),
        runner="gateway",
        max_model_len=min(limit, settings.context_length),
        vocab_size=tokenizer.vocab_size,
        chat_template=template.source if template else None,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        eos_token_ids=tokenizer.eos_token_ids,
        is_reasoning=bool(template and template.is_reasoning),
        template_prefills_think=bool(template and template.prefills_think),
        created=int(time.time()),
    )
    # the engine's default system prompt (engine/loader.py), so gateway and engine render alike.
    return GatewayEngine(settings, tokenizer, template, info, default_system_prompt=model.default_system_prompt)


def _gguf_vocab(path: Path) -> tuple[Tokenizer, str | None, int]:
    import llama_cpp as lc

    from deepseek_serve.engine.runners.llamacpp.backend import init_backend
    from deepseek_serve.engine.runners.llamacpp.tokenizer import LlamaCppTokenizer

    init_backend()
    params = lc.llama_model_default_params()
    params.vocab_only = True
    model = lc.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise RuntimeError(f"llama.cpp could not read the vocabulary of {path}")
    raw = lc.llama_model_chat_template(model, None)
    trained = int(lc.llama_model_n_ctx_train(model))
    return LlamaCppTokenizer(model), raw.decode("utf-8") if raw else None, trained


def _hf_vocab(path: Path) -> tuple[Tokenizer, str | None, int]:
    from deepseek_serve.engine.runners.pytorch.tokenizer import HFTokenizer, read_chat_template

    trained = 0
    with contextlib.suppress(OSError, ValueError, TypeError):
        trained = int(orjson.loads((path / "config.json").read_bytes()).get("max_position_embeddings", 0))
    return HFTokenizer(path), read_chat_template(path), trained
