"""POST /v1/chat/completions."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from deepseek_serve.api.body import LimitedBodyRoute
from deepseek_serve.api.deps import InferenceDep, ServicesDep
from deepseek_serve.api.errors import ApiError
from deepseek_serve.api.generation import (
    Plan,
    PromptInput,
    check_body,
    check_model,
    new_completion_id,
    render_chat,
    run_plan,
    sampling_params,
    tokenize,
)
from deepseek_serve.api.reasoning import prepare_messages
from deepseek_serve.api.schemas import ChatCompletion, ChatCompletionRequest
from deepseek_serve.api.structured import response_format_grammar

router = APIRouter(prefix="/v1", tags=["chat"], route_class=LimitedBodyRoute)


@router.post("/chat/completions", response_model=ChatCompletion,
             responses={200: {"content": {"text/event-stream": {}}}})
async def create_chat_completion(body: ChatCompletionRequest, request: Request, services: ServicesDep,
                                 principal: InferenceDep) -> Response:
    """OpenAI chat completions (JSON or SSE with `stream: true`), with DeepSeek's `reasoning_content`
    and usage fields. `conversation_id` (extension) prepends the stored history of that conversation."""
    model = check_model(services, body.model)
    check_body(services, body, num_messages=len(body.messages))
    engine = services.engine
    info = engine.model_info
    new_messages = prepare_messages(body.messages)
    history: list[dict[str, Any]] = []
    if body.conversation_id is not None:
        if services.conversations is None:
            raise ApiError(400, "Conversations are not enabled on this server.", "invalid_request_error",
                           "conversation_id", "unsupported_parameter")
        history = await services.conversations.history(principal, body.conversation_id)
        history = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in history]
        check_body(services, body, num_messages=len(history) + len(new_messages))
    prompt_text = await render_chat(services, history + new_messages)
    # NOTE: the template writes BOS itself when the model wants one.
    token_ids = await tokenize(services, prompt_text, add_special_tokens=False)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "Invalid value for 'top_logprobs': requires 'logprobs' to be true.",
                       "invalid_request_error", "top_logprobs", "invalid_value")
    params = sampling_params(body, max_tokens, bool(body.logprobs), body.top_logprobs or 0, info.sampling)
    grammar = response_format_grammar(body.response_format)
    if grammar is not None:
        if info.is_reasoning:
            raise ApiError(400, "response_format json_object/json_schema is not supported for reasoning models "
                                "(the output starts with free-form <think> text).", "invalid_request_error",
                           "response_format", "unsupported_value")
        params = replace(params, grammar=grammar)
    plan = Plan(
        endpoint="chat.completions",
        completion_id=new_completion_id("chatcmpl"),
        model=model,
        prompts=(PromptInput(token_ids, prompt_text),),
        params=params,
        n=body.n,
        stream=bool(body.stream),
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        split_reasoning=info.is_reasoning,
        reasoning_prefilled=info.template_prefills_think,
        use_cache=body.cache is not False,
        conversation_id=body.conversation_id,
        conversation_messages=tuple(new_messages),
    )
    return await run_plan(request, services, principal, plan)
