"""Request and response bodies in OpenAI's shapes (plus DeepSeek's usage and reasoning fields).

Requests accept and ignore unknown fields (`extra="allow"`), as OpenAI does, so newer clients keep
working. Ranges of sampling values are checked by `SamplingParams.validate` (one source of truth),
which names the offending field; types, shapes and fixed bounds are checked here, limits that depend
on settings or on the model (vocabulary, context) in `serving/checks.py`. Every string a request
carries is `Text`: valid Unicode (no lone surrogate, which JSON's `\ud800` escapes can produce and
no UTF-8 encoder accepts) and without NUL, which C libraries read as the end of the string.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, StrictInt, Tag, field_validator

INT32_MAX = 2**31 - 1
MAX_LOGIT_BIAS = 1024  # entries of one logit_bias map
MAX_TOP_LOGPROBS = 20  # chat `top_logprobs` (OpenAI's bound)
MAX_COMPLETION_LOGPROBS = 5  # completions `logprobs` (OpenAI's bound)


def check_text(value: str) -> str:
    """Refuse strings a native library cannot take: lone surrogates and NUL."""
    if "\x00" in value:
        raise ValueError(f"must not contain NUL characters (at index {value.index(chr(0))})")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"is not valid Unicode (a lone surrogate at index {exc.start})") from None
    return value


Text = Annotated[str, AfterValidator(check_text)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class _Response(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


# --- requests ---------------------------------------------------------------------------------------
class TextPart(_Request):
    type: Literal["text"]
    text: Text


class ToolCallFunction(_Request):
    name: Text = Field(max_length=64)
    arguments: Text  # a JSON object as a string


class ToolCallIn(_Request):
    id: Text = Field(max_length=64)
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = Field(None, max_length=256)
    reasoning_content: Text | None = None  # DeepSeek: dropped before rendering
    tool_calls: list[ToolCallIn] | None = Field(None, max_length=128)  # assistant messages
    tool_call_id: Text | None = Field(None, max_length=64)  # tool messages

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool | None = None


class _SamplingFields(_Request):
    model: Text = Field(max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, ge=1, le=16)
    stop: Text | list[Text] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = Field(
        None, max_length=MAX_LOGIT_BIAS, description="token id -> bias in [-100, 100]"
    )
    user: Text | None = Field(None, max_length=256)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # extensions (vLLM / llama.cpp names); top_k is bounded by the vocabulary (checked with the model)
    top_k: int | None = Field(None, ge=0, le=INT32_MAX)
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = Field(None, ge=0, le=INT32_MAX)
    ignore_eos: bool | None = None
    # deepseek-serve extensions used by the storage and cache layers
    cache: bool | None = None
    # speculative decoding when the server has it on (DS_SPECULATIVE); false opts out (same output)
    speculative: bool | None = None

    @field_validator("n", mode="before")
    @classmethod
    def _n_null(cls, value: Any) -> Any:
        return 1 if value is None else value  # an explicit null means "not set", as in OpenAI's API


class JsonSchemaSpec(_Request):
    name: Text = Field("response", max_length=64)
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


FUNCTION_NAME = r"^[A-Za-z0-9_.\-]{1,64}$"


class FunctionDef(_Request):
    name: str = Field(pattern=FUNCTION_NAME)
    description: Text | None = Field(None, max_length=4096)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Request):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Request):
    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    conversation_id: Text | None = Field(None, max_length=64)
    response_format: ResponseFormat | None = None
    tools: list[ToolDef] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


def _prompt_kind(value: Any) -> str:
    """Which shape of `prompt` the value has: errors then name that shape's problem alone."""
    if isinstance(value, list) and value:
        if isinstance(value[0], str):
            return "list[str]"
        return "list[list[int]]" if isinstance(value[0], list) else "list[int]"
    return "list[int]" if isinstance(value, list) else "str"


class CompletionRequest(_SamplingFields):
    prompt: Annotated[
        Annotated[Text, Tag("str")]
        | Annotated[list[Text], Tag("list[str]")]
        | Annotated[list[StrictInt], Tag("list[int]")]
        | Annotated[list[list[StrictInt]], Tag("list[list[int]]")],
        Discriminator(_prompt_kind),
    ]
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool | None = False
    suffix: Text | None = None
    best_of: int | None = Field(None, ge=1, le=INT32_MAX)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("must not be an empty list")
        return value


# --- responses --------------------------------------------------------------------------------------
class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class CompletionTokensDetails(_Response):
    reasoning_tokens: int = 0


class SpeculativeTokens(_Response):
    drafted: int = 0  # tokens guessed and verified
    accepted: int = 0  # guesses the model kept


class UsageInfo(_Response):
    """OpenAI's usage plus DeepSeek's prompt-cache fields, and `speculative_tokens` (an extension,
    present only when speculative decoding ran for the request)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_cache_hit_tokens: int = 0
    prompt_cache_miss_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    completion_tokens_details: CompletionTokensDetails = Field(default_factory=CompletionTokensDetails)
    speculative_tokens: SpeculativeTokens | None = Field(None, exclude_if=lambda value: value is None)

    @classmethod
    def build(
        cls,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int,
        reasoning_tokens: int = 0,
        drafted_tokens: int = 0,
        accepted_tokens: int = 0,
    ) -> UsageInfo:
        return cls(
            speculative_tokens=SpeculativeTokens(drafted=drafted_tokens, accepted=accepted_tokens)
            if drafted_tokens
            else None,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_cache_hit_tokens=cached_tokens,
            prompt_cache_miss_tokens=prompt_tokens - cached_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
            completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning_tokens),
        )


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None


class FunctionCall(_Response):
    name: str
    arguments: str  # JSON


class ToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class FunctionCallDelta(_Response):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Response):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "deepseek-serve"
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]
