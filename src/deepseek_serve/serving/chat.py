"""A /v1/chat/completions body as a `GenerationPlan`: stored conversation history, tools,
`response_format`, the chat template and the tokenizer."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from deepseek_serve.contracts import Principal
from deepseek_serve.serving.checks import check_body, check_model
from deepseek_serve.serving.failures import ApiError
from deepseek_serve.serving.plan import GenerationPlan, PromptInput, new_completion_id, sampling_params
from deepseek_serve.serving.prompts import render_chat, tokenize
from deepseek_serve.serving.reasoning import prepare_messages
from deepseek_serve.serving.schemas import ChatCompletionRequest, ChatMessage, NamedToolChoice
from deepseek_serve.serving.services import Services
from deepseek_serve.serving.structured import response_format_grammar
from deepseek_serve.serving.tools import ToolSetup, forced_grammar, render_messages, tool_format


async def plan_chat(services: Services, principal: Principal, body: ChatCompletionRequest) -> GenerationPlan:
    """The plan of a chat completion; `conversation_id` (extension) prepends the stored history of
    that conversation. Raises a 400/404 naming the field for what cannot be served."""
    model = check_model(services, body.model)
    check_body(services, body, num_messages=len(body.messages))
    info = services.engine.model_info
    history: list[ChatMessage] = []
    if body.conversation_id is not None:
        if services.conversations is None:
            raise ApiError(
                400,
                "Conversations are not enabled on this server.",
                "invalid_request_error",
                "conversation_id",
                "unsupported_parameter",
            )
        stored = await services.conversations.history(principal, body.conversation_id)
        history = [ChatMessage.model_validate(m) for m in stored]
        check_body(services, body, num_messages=len(history) + len(body.messages))
    messages = history + list(body.messages)
    prepared = prepare_messages(messages)
    tools, tool_setup, forced = _tool_inputs(body, info.chat_template)
    grammar = response_format_grammar(body.response_format)
    extra: dict[str, Any] = {}
    if tools or any(m.role == "tool" or m.tool_calls for m in messages):
        # tool history (stored or sent) goes through the template as structured calls and results
        fmt = tool_format(info.chat_template)
        prompt_messages, extra = render_messages(
            prepared, messages, fmt, tools, forced if forced != "required" else None
        )
    else:
        prompt_messages = prepared
    if tool_setup is not None and tool_setup.forced:
        if grammar is not None:
            raise ApiError(
                400,
                "response_format cannot be combined with a forced tool_choice.",
                "invalid_request_error",
                "tool_choice",
                "invalid_value",
            )
        assert tools is not None
        grammar = forced_grammar(tools, forced if forced != "required" else None, parallel=tool_setup.parallel)
    prompt_text = await render_chat(services, prompt_messages, extra)
    # the template writes BOS itself when the model wants one
    token_ids = await tokenize(services, prompt_text, add_special_tokens=False)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(
            400,
            "Invalid value for 'top_logprobs': requires 'logprobs' to be true.",
            "invalid_request_error",
            "top_logprobs",
            "invalid_value",
        )
    params = sampling_params(body, max_tokens, bool(body.logprobs), body.top_logprobs or 0, info.sampling)
    if grammar is not None:
        if info.is_reasoning:
            param = "response_format" if body.response_format is not None else "tool_choice"
            raise ApiError(
                400,
                f"{param} needs constrained decoding, which is not supported for reasoning models "
                "(their output starts with free-form <think> text).",
                "invalid_request_error",
                param,
                "unsupported_value",
            )
        params = replace(params, grammar=grammar)
    return GenerationPlan(
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
        use_cache=body.cache is not False and tool_setup is None,
        conversation_id=body.conversation_id,
        conversation_messages=tuple(_stored(prepared[len(history) :], body.messages)),
        tools=tool_setup,
    )


def _tool_inputs(
    body: ChatCompletionRequest,
    template: str | None,
) -> tuple[list[dict[str, Any]] | None, ToolSetup | None, str]:
    """(tools to render, how to parse the answer, "" / "required" / the forced function's name)."""
    choice = body.tool_choice
    if choice is not None and choice != "none" and not body.tools:
        raise ApiError(
            400,
            "Invalid value for 'tool_choice': it requires 'tools'.",
            "invalid_request_error",
            "tool_choice",
            "invalid_value",
        )
    if not body.tools or choice == "none":
        return None, None, ""
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    names = tuple(t.function.name for t in body.tools)
    if len(set(names)) != len(names):
        raise ApiError(
            400,
            "Invalid value for 'tools': function names must be unique.",
            "invalid_request_error",
            "tools",
            "invalid_value",
        )
    forced = ""
    if isinstance(choice, NamedToolChoice):
        forced = choice.function.name
        if forced not in names:
            raise ApiError(
                400,
                f"Invalid value for 'tool_choice': the function {forced!r} is not in 'tools'.",
                "invalid_request_error",
                "tool_choice",
                "invalid_value",
            )
    elif choice == "required":
        forced = "required"
    setup = ToolSetup(tool_format(template), names, parallel=body.parallel_tool_calls is not False, forced=bool(forced))
    return tools, setup, forced


def _stored(entries: list[dict[str, Any]], messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """This turn's messages as the conversation stores them: the template entries, with an
    assistant's `tool_calls` and a tool result's `tool_call_id` kept structured."""
    out = []
    for entry, message in zip(entries, messages, strict=True):
        entry = {k: v for k, v in entry.items() if k in ("role", "content")}
        if message.role == "assistant" and message.tool_calls:
            entry["tool_calls"] = [c.model_dump(include={"id", "type", "function"}) for c in message.tool_calls]
        if message.role == "tool" and message.tool_call_id:
            entry["tool_call_id"] = message.tool_call_id
        out.append(entry)
    return out
