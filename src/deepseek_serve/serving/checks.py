"""Limits a generation request must keep, checked before any engine work.

`check_body` runs on the validated body before templating or tokenizing (limits from the settings);
`check_plan` on the plan, for what only the engine knows; `check_model` maps the `model` field.
"""

from __future__ import annotations

from deepseek_serve.serving.failures import NotFoundError, invalid_value
from deepseek_serve.serving.plan import GenerationPlan
from deepseek_serve.serving.schemas import ChatCompletionRequest, CompletionRequest
from deepseek_serve.serving.services import Services


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


def check_body(
    services: Services,
    body: ChatCompletionRequest | CompletionRequest,
    num_prompts: int = 1,
    num_messages: int = 0,
) -> None:
    """Limits a body must keep before any templating or tokenizing: choices (n x prompts), messages,
    number and length of stop strings. Raises a 400 naming the field."""
    settings = services.settings
    if num_messages > settings.max_messages:
        raise invalid_value(
            "messages",
            f"{num_messages} messages; at most {settings.max_messages} are allowed "
            "(stored conversation history included)",
        )
    choices = body.n * num_prompts
    if choices > settings.max_choices:
        raise invalid_value("n", f"n x prompts = {choices} choices; at most {settings.max_choices} are allowed")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
    if len(stop) > settings.max_stop_sequences:
        raise invalid_value("stop", f"at most {settings.max_stop_sequences} stop sequences are allowed")
    for text in stop:
        if len(text) > settings.max_stop_chars:
            raise invalid_value(
                "stop", f"a stop sequence has {len(text)} characters; at most {settings.max_stop_chars} are allowed"
            )


def check_plan(services: Services, plan: GenerationPlan) -> None:
    """What only the engine knows (sampling values, token ids, top_k and logit_bias within the
    vocabulary), checked before the rate limiter or the response cache see the request. Prompt +
    max_tokens against the context is checked by `add_request`, after admission, so that refusal
    carries the rate-limit headers; the schema bounds max_tokens, so the reservation stays finite."""
    choices = plan.n * len(plan.prompts)
    if choices > services.settings.max_choices:
        raise invalid_value(
            "n", f"n x prompts = {choices} choices; at most {services.settings.max_choices} are allowed"
        )
    for prompt in plan.prompts:
        services.engine.check_request(plan.params, prompt.token_ids, context=False)
