"""The generation plan: what one /v1/chat/completions or /v1/completions request asks for.

A route turns its validated body into a `GenerationPlan` (prompts already tokenized, sampling
parameters, n, streaming and output options); everything after that reads only the plan.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import orjson

from deepseek_serve.engine.types import SamplingDefaults, SamplingParams
from deepseek_serve.serving.failures import invalid_value
from deepseek_serve.serving.schemas import ChatCompletionRequest, CompletionRequest
from deepseek_serve.serving.tools import ToolSetup

Endpoint = Literal["chat.completions", "completions"]


@dataclass(frozen=True)
class PromptInput:
    token_ids: tuple[int, ...]
    text: str  # rendered prompt (chat) or the prompt as given; used for echo, cache keys, storage


@dataclass(frozen=True)
class GenerationPlan:
    """One request's generation, as the route validated it; choice i of prompt p has index p * n + i."""

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

    @property
    def is_chat(self) -> bool:
        return self.endpoint == "chat.completions"

    def response_cache_key(self, owner: int | None) -> str:
        """The response-cache key; `owner` (the API key id under `DS_RESPONSE_CACHE_SCOPE=key`) is
        part of it, so one key's answers are never served to another."""
        material = {
            "owner": None if owner is None else str(owner),
            "endpoint": self.endpoint,
            "model": self.model,
            "prompts": [p.token_ids for p in self.prompts],
            "n": self.n,
            "echo": self.echo,
            "reasoning": [self.split_reasoning, self.reasoning_prefilled],
            "params": asdict(self.params),
        }
        return "resp:" + hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()


def new_completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _logit_bias(raw: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    if not raw:
        return ()
    out: list[tuple[int, float]] = []
    for key, bias in raw.items():
        key = key.strip()
        if not key.isascii() or not key.isdigit() or len(key) > 10:
            raise invalid_value("logit_bias", f"the key {key[:32]!r} is not a token id")
        out.append((int(key), float(bias)))
    return tuple(sorted(out))


def sampling_params(
    body: ChatCompletionRequest | CompletionRequest,
    max_tokens: int | None,
    logprobs: bool,
    top_logprobs: int,
    defaults: SamplingDefaults | None = None,
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
        speculative=getattr(body, "speculative", None) is not False,
    )
