"""A sequence: one request's tokens and progress through the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from deepseek_serve.engine.types import FinishReason, SamplingParams, TokenLogprob


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved completion budget (params.max_tokens or what fits)
    deadline: float  # time.monotonic() after which the request is aborted
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    slot: int | None = None  # runner-owned KV slot while running
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # prompt tokens reused from the prefix cache
    num_drafted_tokens: int = 0  # speculative guesses verified
    num_accepted_tokens: int = 0  # speculative guesses kept
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, index: int) -> int:
        n = self.num_prompt_tokens
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    @property
    def max_total_tokens(self) -> int:
        """Prompt + the completion budget: what admission reserves in the KV cache."""
        return self.num_prompt_tokens + self.max_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
