"""What one generation request costs and how it ended, and the hooks that record it.

`RequestAccounting` follows a request from admission to its end:

1. `admit`: the rate limiter reserves prompt + max_tokens (429 when refused);
2. one summary, built once per request: `summarize` from the choices the engine generated, or
   `summarize_cache_hit` from a response-cache hit; it fills the `RequestOutcome`, whose `usage()`
   is the usage the client sees;
3. `settle`, once per request, also when the client went away: `limiter.settle`,
   `conversations.append_turn`, `usage.record`, `metrics.observe_request` (cache hits included,
   with the finish reason "cached") and the log line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from deepseek_serve.contracts import Principal, RateLimitDecision, UsageEvent
from deepseek_serve.observability.logs import bind_log_fields
from deepseek_serve.serving.choice import ChoiceState
from deepseek_serve.serving.failures import FAILED_FINISH_REASONS, RateLimitError
from deepseek_serve.serving.plan import GenerationPlan
from deepseek_serve.serving.schemas import UsageInfo
from deepseek_serve.serving.services import Services

logger = logging.getLogger(__name__)

CACHE_HIT = "cache_hit"  # the finish reason a response-cache hit is recorded with
CACHE_HIT_METRIC = "cached"  # its `finish_reason` label in the request metrics


@dataclass
class RequestOutcome:
    """How a request ended and what it cost, as the accounting hooks see it."""

    status: int = 200
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    drafted_tokens: int = 0  # speculative decoding, over all choices
    accepted_tokens: int = 0
    completion_text: str | None = None
    answer: dict[str, Any] | None = None  # the assistant message stored in the conversation
    completed: bool = False
    from_cache: bool = False

    def usage(self) -> UsageInfo:
        """The usage block of the answer."""
        return UsageInfo.build(
            self.prompt_tokens,
            self.completion_tokens,
            self.cached_tokens,
            self.reasoning_tokens,
            self.drafted_tokens,
            self.accepted_tokens,
        )


def overall_finish_reason(choices: Sequence[ChoiceState]) -> str | None:
    """The request's finish reason: the first failure among the choices, else the first choice's."""
    reasons = [c.finish_reason for c in choices]
    if not reasons:
        return None
    return next((r for r in reasons if r in FAILED_FINISH_REASONS), reasons[0])


class RequestAccounting:
    def __init__(self, services: Services, principal: Principal, plan: GenerationPlan) -> None:
        self.services = services
        self.principal = principal
        self.plan = plan
        self.decision: RateLimitDecision | None = None
        self.outcome = RequestOutcome()
        self.started = time.monotonic()
        self._summarized = False

    @property
    def headers(self) -> dict[str, str]:
        """The rate-limit headers of an admitted request (every answer after admission carries them)."""
        return self.decision.headers() if self.decision is not None else {}

    # --- admission --------------------------------------------------------------------------------
    def reserve_tokens(self) -> int:
        max_len = self.services.engine.model_info.max_model_len
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
            raise RateLimitError.refused(decision)
        self.decision = decision

    def reject(self, reason: str) -> None:
        if self.services.metrics is not None:
            self.services.metrics.rejected(reason)

    # --- the summary --------------------------------------------------------------------------------
    def _mark_summarized(self) -> RequestOutcome:
        if self._summarized:
            raise RuntimeError("a request is summarized once")
        self._summarized = True
        return self.outcome

    @property
    def summarized(self) -> bool:
        return self._summarized

    def summarize(self, choices: Sequence[ChoiceState]) -> RequestOutcome:
        """Fill the outcome from the generated choices; each prompt counts once, however many choices
        (n) continue it."""
        out = self._mark_summarized()
        if not choices:
            return out
        plan = self.plan
        out.finish_reason = overall_finish_reason(choices)
        out.prompt_tokens = plan.num_prompt_tokens
        out.completion_tokens = sum(c.completion_tokens for c in choices)
        out.drafted_tokens = sum(c.drafted_tokens for c in choices)
        out.accepted_tokens = sum(c.accepted_tokens for c in choices)
        out.cached_tokens = min(sum(c.cached_tokens for c in choices if c.index % plan.n == 0), out.prompt_tokens)
        first = choices[0]
        if first.splitter is not None:
            out.reasoning_tokens = sum(self._reasoning_tokens(c) for c in choices)
        out.completion_text = first.content_text
        out.answer = {"role": "assistant", "content": first.content_text}
        if first.splitter is not None:
            out.answer["reasoning_content"] = first.splitter.reasoning_text or None
        if plan.tools is not None:
            content, calls = first.tool_calls(plan.tools)
            if calls:  # stored as structured calls, not as the model's call markup
                out.answer["content"] = content
                out.answer["tool_calls"] = [c.model_dump(include={"id", "type", "function"}) for c in calls]
        return out

    def _reasoning_tokens(self, choice: ChoiceState) -> int:
        if choice.splitter is None or not choice.splitter.reasoning_text:
            return 0
        # the reasoning text re-tokenized plus the two tags; exact for the usual tokenizers
        n = len(self.services.engine.tokenize(choice.splitter.reasoning_text, add_special_tokens=False)) + 2
        return min(n, choice.completion_tokens)

    def summarize_cache_hit(self, body: dict[str, Any]) -> RequestOutcome:
        """Fill the outcome of a response-cache hit the way a finished generation fills it: token
        counts for usage and the limiter, the first choice's text as the answer for the conversation."""
        out = self._mark_summarized()
        usage = body.get("usage") or {}
        out.finish_reason = CACHE_HIT
        out.from_cache = True
        out.prompt_tokens = int(usage.get("prompt_tokens", 0))
        out.completion_tokens = int(usage.get("completion_tokens", 0))
        out.cached_tokens = out.prompt_tokens
        details = usage.get("completion_tokens_details") or {}
        out.reasoning_tokens = int(details.get("reasoning_tokens", 0))
        choices = body.get("choices") or [{}]
        first = choices[0] if isinstance(choices[0], dict) else {}
        if self.plan.is_chat:
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
        return out

    # --- the end ----------------------------------------------------------------------------------
    async def settle(self, choices: Sequence[ChoiceState]) -> None:
        """The accounting hooks, once per request (`GenerationRun.finish`), also when the client went
        away; the limiter and the conversation are shielded from cancellation."""
        services, plan, out = self.services, self.plan, self.outcome
        with anyio.CancelScope(shield=True):
            if self.decision is not None and services.limiter is not None:
                try:
                    await services.limiter.settle(
                        self.principal, self.decision, out.prompt_tokens + out.completion_tokens
                    )
                except Exception:
                    logger.exception("limiter.settle failed")
            if out.completed and plan.conversation_id and services.conversations is not None and out.answer is not None:
                try:
                    await services.conversations.append_turn(
                        self.principal,
                        plan.conversation_id,
                        list(plan.conversation_messages),
                        out.answer,
                        out.prompt_tokens,
                        out.completion_tokens,
                    )
                except Exception:
                    logger.exception("conversations.append_turn failed")
        first = choices[0] if choices else None
        timings = first.timings if first is not None else None
        if services.usage is not None:
            store = services.settings.store_content
            services.usage.record(
                UsageEvent(
                    request_id=plan.completion_id,
                    key_id=self.principal.key_id,
                    model=plan.model,
                    endpoint=plan.endpoint,
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
                    prompt_text="\n".join(p.text for p in plan.prompts) if store else None,
                    completion_text=out.completion_text if store else None,
                    created_at=time.time(),
                )
            )
            if services.settings.usage_sync_timeout_s > 0:
                # the client's success (its last byte) comes after the record is durable
                with anyio.CancelScope(shield=True):
                    await services.usage.persisted(services.settings.usage_sync_timeout_s)
        if services.metrics is not None and (choices or out.from_cache):
            if out.finish_reason == "timeout":
                services.metrics.rejected("timeout")
            services.metrics.observe_request(
                endpoint=plan.endpoint,
                finish_reason=CACHE_HIT_METRIC if out.from_cache else out.finish_reason,
                prompt_tokens=out.prompt_tokens,
                completion_tokens=out.completion_tokens,
                cached_tokens=out.cached_tokens,
                queue_s=None if timings is None else timings.queue_s,
                ttft_s=None if timings is None else timings.first_token_s,
                e2e_s=time.monotonic() - self.started,
                itl_s=first.inter_token_latencies() if first is not None else [],
            )
        bind_log_fields(tokens=out.prompt_tokens + out.completion_tokens)
        logger.info(
            "%s %s finished: %s, %d prompt + %d completion tokens (%d cached), status %d",
            plan.endpoint,
            plan.completion_id,
            out.finish_reason,
            out.prompt_tokens,
            out.completion_tokens,
            out.cached_tokens,
            out.status,
        )
