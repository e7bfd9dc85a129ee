"""Request bodies of /v1/conversations in OpenAI's Conversations API shapes (`metadata`, `items`) next
to our own fields (`title`, `messages`), and input items turned into what storage keeps.

Items are those of OpenAI's `ResponseInputItemParam` that a chat model can take: messages (text
content, as a string or `input_text` / `output_text` parts), `function_call` and
`function_call_output`. Other item types (images, files, reasoning, built-in tools) are a 400.
Every optional field accepts an explicit null as "not set".
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag

from deepseek_serve.serving.failures import ApiError
from deepseek_serve.serving.schemas import FUNCTION_NAME, ChatMessage, Text
from deepseek_serve.storage.conversations import FUNCTION_CALL, FUNCTION_CALL_OUTPUT

MAX_METADATA_PAIRS = 16  # OpenAI's bounds of `metadata`
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_ITEMS_PER_REQUEST = 20  # OpenAI's bound of `items` in one create call
MAX_CONTENT_PARTS = 64

Metadata = Annotated[
    dict[
        Annotated[str, StringConstraints(max_length=MAX_METADATA_KEY)],
        Annotated[Text, StringConstraints(max_length=MAX_METADATA_VALUE)],
    ],
    Field(max_length=MAX_METADATA_PAIRS),
]


class _Item(BaseModel):
    # items echoed back from a list carry `id`, `status` and the like: accepted and ignored
    model_config = ConfigDict(extra="ignore")


class TextPartIn(_Item):
    type: Literal["input_text", "output_text", "text"]
    text: Text


Content = Text | Annotated[list[TextPartIn], Field(max_length=MAX_CONTENT_PARTS)]


class MessageItemIn(_Item):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content


class FunctionCallItemIn(_Item):
    type: Literal["function_call"]
    call_id: Text = Field(min_length=1, max_length=64)
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: Text  # a JSON object as a string


class FunctionCallOutputItemIn(_Item):
    type: Literal["function_call_output"]
    call_id: Text = Field(min_length=1, max_length=64)
    output: Content


def _item_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return str(kind or "message")  # an "easy" input message has no type


InputItem = Annotated[
    Annotated[MessageItemIn, Tag("message")]
    | Annotated[FunctionCallItemIn, Tag(FUNCTION_CALL)]
    | Annotated[FunctionCallOutputItemIn, Tag(FUNCTION_CALL_OUTPUT)],
    Discriminator(
        _item_tag,
        custom_error_type="invalid_item_type",
        custom_error_message="unsupported item type; supported: message, function_call, function_call_output",
    ),
]


class CreateConversationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # OpenAI's fields
    metadata: Metadata | None = None
    items: Annotated[list[InputItem], Field(max_length=MAX_ITEMS_PER_REQUEST)] | None = None
    # ours
    title: Text | None = Field(None, max_length=255)
    messages: list[ChatMessage] | None = Field(None, max_length=1000, description="seed messages, e.g. a system prompt")


class UpdateConversationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metadata: Metadata | None = None  # null clears it
    title: Text | None = Field(None, max_length=255)  # ours


class CreateItemsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: Annotated[list[InputItem], Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)]


def _text(content: str | list[TextPartIn]) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)


def stored_items(items: list[MessageItemIn | FunctionCallItemIn | FunctionCallOutputItemIn]) -> list[dict[str, Any]]:
    """Input items as the dicts storage keeps (conversations._message_rows); a function call's
    arguments must be a JSON object, since the chat templates render them as one."""
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        if isinstance(item, FunctionCallItemIn):
            try:
                arguments = json.loads(item.arguments)
            except ValueError:
                arguments = None
            if not isinstance(arguments, dict):
                raise ApiError(
                    400,
                    f"Invalid value for 'items[{i}].arguments': it must be a JSON object as a string.",
                    "invalid_request_error",
                    f"items[{i}].arguments",
                    "invalid_value",
                )
            out.append({"type": FUNCTION_CALL, "call_id": item.call_id, "name": item.name, "arguments": item.arguments})
        elif isinstance(item, FunctionCallOutputItemIn):
            out.append({"type": FUNCTION_CALL_OUTPUT, "call_id": item.call_id, "output": _text(item.output)})
        else:
            out.append({"role": item.role, "content": _text(item.content)})
    return out


def stored_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Our `messages` seed as storage dicts, tool calls and tool results kept structured."""
    out: list[dict[str, Any]] = []
    for m in messages:
        entry: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.role == "assistant" and m.tool_calls:
            entry["tool_calls"] = [c.model_dump(include={"id", "type", "function"}) for c in m.tool_calls]
        if m.role == "tool" and m.tool_call_id:
            entry["tool_call_id"] = m.tool_call_id
        out.append(entry)
    return out


def estimated_tokens(entries: list[dict[str, Any]]) -> int:
    """What a write costs against the key's token limit: its text at 4 bytes a token, plus one per entry."""
    size = 0
    for e in entries:
        for key in ("content", "arguments", "output"):
            value = e.get(key)
            if isinstance(value, str):
                size += len(value.encode())
    return size // 4 + len(entries)
