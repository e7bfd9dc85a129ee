"""`GenerationRun`: one request's choices in the engine, from submission to the accounting at its end."""

from __future__ import annotations

from dataclasses import replace

import anyio

from deepseek_serve.contracts import Principal
from deepseek_serve.engine.errors import ContextLengthError, EngineError, QueueFullError
from deepseek_serve.engine.types import GenerationRequest
from deepseek_serve.observability.logs import bind_log_fields
from deepseek_serve.serving.accounting import RequestAccounting, RequestOutcome
from deepseek_serve.serving.choice import ChoiceState
from deepseek_serve.serving.failures import from_engine_error
from deepseek_serve.serving.plan import GenerationPlan
from deepseek_serve.serving.reasoning import ReasoningSplitter
from deepseek_serve.serving.services import Services
from deepseek_serve.serving.tools import ToolStream


class GenerationRun:
    """The choices of one request (prompts x n) and its accounting; `finish()` runs exactly once."""

    def __init__(self, services: Services, principal: Principal, plan: GenerationPlan) -> None:
        self.services = services
        self.plan = plan
        self.accounting = RequestAccounting(services, principal, plan)
        self.choices: list[ChoiceState] = []
        self._finished = False

    @property
    def outcome(self) -> RequestOutcome:
        return self.accounting.outcome

    @property
    def headers(self) -> dict[str, str]:
        return self.accounting.headers

    def summarize(self) -> RequestOutcome:
        """The request's one summary, from its choices (see `RequestAccounting.summarize`)."""
        return self.accounting.summarize(self.choices)

    async def submit(self) -> None:
        """Add every choice to the engine. An engine refusal ends the request: it is accounted and
        raised as its API error, carrying the rate-limit headers."""
        plan = self.plan
        # the engine's log lines name a choice by its engine request id, `<completion id>-<index>`: the
        # request's own lines (its access line) carry the completion id to tie them to the request id
        bind_log_fields(completion_id=plan.completion_id)
        try:
            for p_index, prompt in enumerate(plan.prompts):
                for i in range(plan.n):
                    index = p_index * plan.n + i
                    params = plan.params
                    if params.seed is not None and index:
                        params = replace(params, seed=params.seed + index)  # distinct reproducible choices
                    stream = await self.services.engine.add_request(
                        GenerationRequest(
                            request_id=f"{plan.completion_id}-{index}",
                            prompt=prompt.text,
                            prompt_token_ids=prompt.token_ids,
                            params=params,
                            deadline_s=self.services.settings.request_timeout_s,
                            affinity=plan.conversation_id,
                        )
                    )
                    splitter = ReasoningSplitter(plan.reasoning_prefilled) if plan.split_reasoning else None
                    tool_stream = ToolStream(plan.tools) if plan.tools is not None else None
                    self.choices.append(ChoiceState(index, p_index, stream, splitter, tool_stream))
        except EngineError as exc:
            if isinstance(exc, QueueFullError):
                self.accounting.reject("queue_full")
            if isinstance(exc, ContextLengthError) and plan.endpoint == "completions" and exc.param == "messages":
                exc.param = "prompt"
            err = from_engine_error(exc)
            self.outcome.status = err.status
            await self.finish()
            err.headers = {**self.headers, **err.headers}  # x-ratelimit-* on errors after admission too
            raise err from exc

    async def close_streams(self) -> None:
        for choice in self.choices:
            await choice.stream.aclose()

    async def finish(self) -> None:
        """Close the engine streams and run the accounting hooks (once; shielded from cancellation)."""
        if self._finished:
            return
        self._finished = True
        with anyio.CancelScope(shield=True):
            await self.close_streams()
        await self.accounting.settle(self.choices)
