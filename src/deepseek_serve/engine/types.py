"""Value types crossing the engine boundary: what a caller submits and what it gets back."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, TypedDict

from deepseek_serve.engine.errors import InvalidRequestError

FinishReason = Literal["stop", "length", "abort", "timeout", "error"]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 means greedy; a seed makes sampling reproducible."""

    max_tokens: int | None = None  # None = as many as fit, capped by settings.default_max_tokens
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    penalty_last_n: int = 64
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    min_tokens: int = 0
    grammar: str | None = None  # GBNF (llama.cpp's grammar syntax): every output must match it
    speculative: bool = True  # may use speculative decoding when the server has it on (same output)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def is_deterministic(self) -> bool:
        return self.is_greedy or self.seed is not None

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first bad field."""

        def bad(name: str, why: str) -> InvalidRequestError:
            return InvalidRequestError(f"Invalid value for '{name}': {why}", param=name)

        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", f"{self.max_tokens} is less than the minimum of 1")
        for name, value, lo, hi in (
            ("temperature", self.temperature, 0.0, 2.0),
            ("top_p", self.top_p, 0.0, 1.0),
            ("min_p", self.min_p, 0.0, 1.0),
            ("presence_penalty", self.presence_penalty, -2.0, 2.0),
            ("frequency_penalty", self.frequency_penalty, -2.0, 2.0),
        ):
            if not math.isfinite(value) or not lo <= value <= hi:
                raise bad(name, f"{value} is not between {lo} and {hi}")
        if self.top_p == 0.0:
            raise bad("top_p", "must be greater than 0")
        if not math.isfinite(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 10.0:
            raise bad("repetition_penalty", f"{self.repetition_penalty} is not in (0, 10]")
        if self.top_k < 0:
            raise bad("top_k", f"{self.top_k} is negative")
        if not 0 <= self.top_logprobs <= 20:
            raise bad("top_logprobs", f"{self.top_logprobs} is not between 0 and 20")
        if self.top_logprobs and not self.logprobs:
            raise bad("top_logprobs", "requires logprobs to be true")
        if len(self.stop) > 16:  # the API's limit (DS_MAX_STOP_SEQUENCES) is at most this
            raise bad("stop", "at most 16 stop sequences are allowed")
        if any(not s for s in self.stop):
            raise bad("stop", "stop sequences must be non-empty strings")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise bad("seed", "out of range")
        if self.min_tokens < 0:
            raise bad("min_tokens", "must not be negative")
        if self.top_k > 2**31 - 1:
            raise bad("top_k", "out of range")
        if self.grammar is not None and (self.ignore_eos or self.min_tokens):
            raise bad(
                "ignore_eos" if self.ignore_eos else "min_tokens",
                "cannot be combined with a response_format or a forced tool call",
            )
        for token, bias in self.logit_bias:
            if not math.isfinite(bias) or not -100.0 <= bias <= 100.0:
                raise bad("logit_bias", f"the bias of token {token} ({bias}) is not between -100 and 100")


class SamplingChoice(TypedDict):
    """The sampling fields a model recommends (keyword arguments of SamplingParams)."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float


@dataclass(frozen=True)
class SamplingDefaults:
    """A model's recommended sampling (engine/sampling_defaults.py reads it from the model)."""

    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.05
    source: str = "fallback"  # generation_config.json | gguf metadata | fallback

    def fill(
        self,
        *,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
    ) -> SamplingChoice:
        """SamplingParams fields for a request: what it set, the recommendation for what it left open
        (None). A greedy request (temperature 0) gets neutral values for what it left open."""
        temp = self.temperature if temperature is None else temperature
        greedy = temp == 0.0
        return {
            "temperature": temp,
            "top_p": (1.0 if greedy else self.top_p) if top_p is None else top_p,
            "top_k": (0 if greedy else self.top_k) if top_k is None else top_k,
            "min_p": (0.0 if greedy else self.min_p) if min_p is None else min_p,
            "repetition_penalty": (
                (1.0 if greedy else self.repetition_penalty) if repetition_penalty is None else repetition_penalty
            ),
        }


@dataclass(frozen=True)
class GenerationRequest:
    """One unit of work: a prompt (text or token ids) and how to continue it. With both, the token
    ids are the prompt and the text only describes it (a gateway routes on it).

    `deadline_s` is relative to submission; None takes the engine's default request timeout.
    """

    request_id: str
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    deadline_s: float | None = None
    add_special_tokens: bool = True
    affinity: str | None = None  # a routing hint (conversation id) for a gateway; the engine ignores it


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[tuple[str, float, tuple[int, ...]], ...] = ()  # (token, logprob, bytes), best first


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens reused from the prefix cache
    drafted_tokens: int = 0  # speculative decoding: tokens guessed and verified
    accepted_tokens: int = 0  # speculative decoding: guesses the model kept

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class RequestTimings:
    """Seconds, measured with time.monotonic() inside the engine."""

    queue_s: float = 0.0  # submitted -> first scheduled
    first_token_s: float | None = None  # submitted -> first token sampled
    total_s: float = 0.0  # submitted -> finished


@dataclass(frozen=True)
class StreamDelta:
    """What one engine step added to a request.

    `text` never splits a UTF-8 character and never contains (a prefix of) a stop string;
    the last delta of a request has `finished=True`, a `finish_reason`, `usage` and `timings`.
    """

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None
    finished: bool = False
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timings: RequestTimings | None = None
    error: str | None = None  # set with finish_reason "error" or "timeout"


def merge_deltas(deltas: Sequence[StreamDelta]) -> StreamDelta:
    """Consecutive deltas of one request as one: text, token ids and logprobs joined; the end of the
    request (finished, reason, usage, timings, error) from the last, which alone can carry it."""
    if len(deltas) == 1:
        return deltas[0]
    last = deltas[-1]
    logprobs: tuple[TokenLogprob, ...] | None = None
    if any(d.logprobs is not None for d in deltas):
        logprobs = tuple(lp for d in deltas if d.logprobs for lp in d.logprobs)
    return StreamDelta(
        text="".join(d.text for d in deltas),
        token_ids=tuple(t for d in deltas for t in d.token_ids),
        logprobs=logprobs,
        finished=last.finished,
        finish_reason=last.finish_reason,
        usage=last.usage,
        timings=last.timings,
        error=last.error,
    )


@dataclass(frozen=True)
class ModelInfo:
    """What the API needs to know about the loaded model."""

    id: str
    path: str
    runner: str
    max_model_len: int
    vocab_size: int
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    eos_token_ids: tuple[int, ...]
    # True for DeepSeek-R1 style models whose output carries <think>...</think>
    is_reasoning: bool = False
    # True when the rendered generation prompt already ends in "<think>" (output holds only "</think>")
    template_prefills_think: bool = False
    created: int = 0
    # the sampling a request gets for the fields it leaves open
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for health checks and metrics."""

    num_running: int
    num_waiting: int
    max_batch_size: int
    max_queue_size: int
    kv_capacity_tokens: int
    kv_used_tokens: int
    last_step_monotonic: float  # time.monotonic() of the last completed forward step (0 = never)
    steps_total: int
    prompt_tokens_total: int
    generation_tokens_total: int
    prefix_cache_queries_tokens_total: int
    prefix_cache_hits_tokens_total: int
    is_running: bool
    kv_cached_tokens: int = 0  # KV cells idle prefix-cache entries hold (evictable)
    speculative: tuple[tuple[str, int, int], ...] = ()  # (guesser, tokens drafted, tokens accepted)

    @property
    def kv_usage_ratio(self) -> float:
        return self.kv_used_tokens / self.kv_capacity_tokens if self.kv_capacity_tokens else 0.0


@dataclass(frozen=True)
class EngineState:
    """What the engine reports to metrics: its stats and whether it takes new requests. `reports`
    False: another API worker exports this (shared) engine's metrics; this one adds none."""

    stats: EngineStats
    accepting: bool
    reports: bool = True
