"""Answers in OpenAI's shapes: the JSON body of a finished request and the SSE chunks of a stream."""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from deepseek_serve.engine.types import StreamDelta, TokenLogprob
from deepseek_serve.serving.accounting import RequestOutcome
from deepseek_serve.serving.choice import ChoiceState
from deepseek_serve.serving.plan import GenerationPlan
from deepseek_serve.serving.schemas import (
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
)
from deepseek_serve.serving.sse import escape_line_breaks, model_event

TOOL_ARGUMENT_PIECE = 32  # characters of `arguments` per streamed delta


# --- logprobs -------------------------------------------------------------------------------------------
def chat_logprobs(items: Sequence[TokenLogprob]) -> ChatLogprobs:
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


def completion_logprobs(items: Sequence[TokenLogprob], offset: int) -> CompletionLogprobs:
    """Legacy logprobs; `offset` is the character offset of the first token in the choice's text."""
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


# --- the JSON body ------------------------------------------------------------------------------------
def render_body(plan: GenerationPlan, choices: Sequence[ChoiceState], outcome: RequestOutcome) -> bytes:
    """The complete answer (`chat.completion` or `text_completion`); reasoning splitters already fed."""
    body: ChatCompletion | Completion
    if plan.is_chat:
        chat_choices = []
        for c in choices:
            if c.splitter is not None:
                message = AssistantMessage(
                    content=c.splitter.content_text, reasoning_content=c.splitter.reasoning_text or None
                )
            else:
                message = AssistantMessage(content=c.text)
            finish_reason = c.finish_reason
            if plan.tools is not None and message.content:
                content, calls = c.tool_calls(plan.tools)
                if calls:
                    message = AssistantMessage(
                        content=content or None, reasoning_content=message.reasoning_content, tool_calls=calls
                    )
                    finish_reason = "tool_calls"
            logprobs = chat_logprobs(c.logprobs) if plan.params.logprobs else None
            chat_choices.append(
                ChatChoice(index=c.index, message=message, logprobs=logprobs, finish_reason=finish_reason)
            )
        body = ChatCompletion(
            id=plan.completion_id, created=plan.created, model=plan.model, choices=chat_choices, usage=outcome.usage()
        )
    else:
        text_choices = []
        for c in choices:
            prefix = plan.prompts[c.prompt_index].text if plan.echo else ""
            text_logprobs = completion_logprobs(c.logprobs, len(prefix)) if plan.params.logprobs else None
            text_choices.append(
                CompletionChoice(
                    index=c.index, text=prefix + c.text, logprobs=text_logprobs, finish_reason=c.finish_reason
                )
            )
        body = Completion(
            id=plan.completion_id, created=plan.created, model=plan.model, choices=text_choices, usage=outcome.usage()
        )
    return body.model_dump_json().encode()


# --- stream chunks ------------------------------------------------------------------------------------
def opening_event(plan: GenerationPlan, choice: ChoiceState) -> bytes | None:
    """What a stream sends for a choice before any token: the assistant role (chat), the prompt
    (completions with echo), else nothing."""
    if plan.is_chat:
        return model_event(
            ChatCompletionChunk(
                id=plan.completion_id,
                created=plan.created,
                model=plan.model,
                choices=[ChatChunkChoice(index=choice.index, delta=ChatDelta(role="assistant", content=""))],
            )
        )
    if plan.echo:
        return model_event(
            Completion(
                id=plan.completion_id,
                created=plan.created,
                model=plan.model,
                choices=[
                    CompletionChoice(
                        index=choice.index, finish_reason=None, text=plan.prompts[choice.prompt_index].text
                    )
                ],
            )
        )
    return None


def usage_event(plan: GenerationPlan, outcome: RequestOutcome) -> bytes:
    """The last chunk before [DONE] under `stream_options.include_usage`: no choices, the usage."""
    usage = outcome.usage()
    if plan.is_chat:
        return model_event(
            ChatCompletionChunk(id=plan.completion_id, created=plan.created, model=plan.model, choices=[], usage=usage)
        )
    return model_event(
        Completion(id=plan.completion_id, created=plan.created, model=plan.model, choices=[], usage=usage)
    )


def delta_event(plan: GenerationPlan, choice: ChoiceState, delta: StreamDelta) -> bytes | None:
    """The event(s) for one delta of `choice` (already added to it); None when it holds nothing to send yet."""
    return _chat_chunk(plan, choice, delta) if plan.is_chat else _completion_chunk(plan, choice, delta)


# --- the common chunk: text only ------------------------------------------------------------------------
# Most chunks of a stream carry only a piece of text: no reasoning, logprobs, tool calls or finish
# reason. Their event is the choice's template with the text's JSON string in the middle, the same
# bytes the response models give (tests/serving/test_render.py compares them), at a fraction of the
# cost of building and serializing the models per token.
_MARK = "\ue000text\ue000"


def _template(plan: GenerationPlan, index: int) -> tuple[bytes, bytes]:
    body: ChatCompletionChunk | Completion
    if plan.is_chat:
        body = ChatCompletionChunk(
            id=plan.completion_id,
            created=plan.created,
            model=plan.model,
            choices=[ChatChunkChoice(index=index, delta=ChatDelta(content=_MARK))],
        )
    else:
        body = Completion(
            id=plan.completion_id,
            created=plan.created,
            model=plan.model,
            choices=[CompletionChoice(index=index, text=_MARK, finish_reason=None)],
        )
    event = model_event(body)
    head, mark, tail = event.rpartition(orjson.dumps(_MARK))
    assert mark, "the text's place in the chunk"
    return head, tail


def text_event(plan: GenerationPlan, choice: ChoiceState, text: str) -> bytes | None:
    """The event of a chunk carrying only `text` (content of a chat delta, or a completion's text);
    None when the text cannot be encoded directly (the caller builds the models)."""
    template = choice.chunk_template
    if template is None:
        template = choice.chunk_template = _template(plan, choice.index)
    try:
        encoded = orjson.dumps(text)
    except orjson.JSONEncodeError:  # a lone surrogate: the models' serializer says what to do
        return None
    return template[0] + escape_line_breaks(encoded) + template[1]


def _chat_chunk(plan: GenerationPlan, choice: ChoiceState, delta: StreamDelta) -> bytes | None:
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
            choice.tool_answer = (choice.tool_stream.sent.strip(), calls)
            text += rest
    logprobs = chat_logprobs(delta.logprobs) if plan.params.logprobs and delta.logprobs else None
    if not text and not reasoning and logprobs is None and not delta.finished:
        return None  # a tag being held back
    if not reasoning and logprobs is None and not delta.finished:
        event = text_event(plan, choice, text)
        if event is not None:
            return event
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
    events.extend(_tool_call_events(plan, choice.index, calls))
    return b"".join(events)


def _tool_call_events(plan: GenerationPlan, index: int, calls: list[ToolCall]) -> list[bytes]:
    """Tool calls as OpenAI streams them: per call, index + id + name first, then the arguments in
    pieces; then an empty delta with finish_reason "tool_calls"."""

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


def _completion_chunk(plan: GenerationPlan, choice: ChoiceState, delta: StreamDelta) -> bytes | None:
    if not delta.text and not delta.finished and not delta.logprobs:
        return None
    if not delta.finished and not (plan.params.logprobs and delta.logprobs):
        event = text_event(plan, choice, delta.text)
        if event is not None:
            return event
    logprobs: CompletionLogprobs | None = None
    if plan.params.logprobs and delta.logprobs:
        offset = len(plan.prompts[choice.prompt_index].text) if plan.echo else 0
        offset += len(choice.text) - len(delta.text)
        logprobs = completion_logprobs(delta.logprobs, offset)
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
