"""Tool calls on /v1/chat/completions: the tool list and tool history rendered for the model's chat
template, the answer parsed back into OpenAI's `tool_calls`, and the grammar of a forced call.

Three formats, picked from the chat template's source:

- `hermes`: templates that render `tools` themselves and write calls as `<tool_call>{json}</tool_call>`
  (Qwen2.5). The template gets `tools=[...]` and assistant `tool_calls` with arguments as objects.
- `deepseek`: DeepSeek V3/R1 templates, whose history format is `<｜tool▁call▁begin｜>function<｜tool▁sep｜>
  name` + a json block. Their templates do not render the tool list, so it goes into the system prompt
  with the generic instructions; calls are read in both the DeepSeek and the `<tool_call>` shapes.
- `generic`: any other template. The tool list and instructions go into the system prompt, past calls
  become `<tool_call>` blocks in the assistant text and tool results `<tool_response>` user turns.

A forced call (`tool_choice` "required" or a named function) is decoded under a grammar that admits
`<tool_call>` blocks whose JSON matches one allowed function's `parameters` schema: exactly one for a
named function or with `parallel_tool_calls` false, else 1 to MAX_FORCED_CALLS of them.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from deepseek_serve.serving.failures import ApiError
from deepseek_serve.serving.schemas import FunctionCall, ToolCall
from deepseek_serve.serving.structured import schema_grammar

ToolFormat = Literal["hermes", "deepseek", "generic"]

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
DS_CALLS_BEGIN, DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL_BEGIN, DS_CALL_END, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
MARKERS = (CALL_OPEN, DS_CALLS_BEGIN, DS_CALL_BEGIN)
MAX_FORCED_CALLS = 8  # calls a forced `required` choice with parallel_tool_calls may produce

_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.DOTALL)
_DS_CALL = re.compile(
    r"<｜tool▁call▁begin｜>\s*(?:function)?\s*<｜tool▁sep｜>\s*([^\n<]+?)\s*\n```(?:json)?\s*\n(.*?)\n```\s*"
    r"(?:<｜tool▁call▁end｜>|\Z)",
    re.DOTALL,
)
_DS_WRAPPERS = re.compile(r"<｜tool▁calls▁begin｜>|<｜tool▁calls▁end｜>")


def tool_format(template: str | None) -> ToolFormat:
    """Which tool-call format a chat template speaks."""
    source = template or ""
    if DS_CALL_BEGIN in source:
        return "deepseek"
    if CALL_OPEN in source and "tools" in source:
        return "hermes"
    return "generic"


@dataclass(frozen=True)
class ToolSetup:
    """What the answer parser needs: the format, the callable names, whether several calls may come back."""

    format: ToolFormat
    names: tuple[str, ...]
    parallel: bool = True
    forced: bool = False


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, "invalid_value")


def instructions(tools: list[dict[str, Any]], forced: str | None = None) -> str:
    """System-prompt text describing the tools and how to call them (formats without a template of
    their own for the tool list)."""
    lines = [json.dumps(t["function"], ensure_ascii=False) for t in tools]
    how = (
        "To call a function, reply with one <tool_call></tool_call> block per call, each holding a JSON object "
        'with the function\'s "name" and its "arguments" object:\n'
        '<tool_call>\n{"name": "<function name>", "arguments": {...}}\n</tool_call>'
    )
    text = "You can call these functions (JSON Schema signatures):\n<tools>\n" + "\n".join(lines) + "\n</tools>\n"
    if forced:
        how += f"\nCall the function {forced} now."
    return text + how


def _arguments_object(raw: str, index: int) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise _bad("messages", f"messages[{index}].tool_calls: function.arguments must be a JSON object string")
    return value


def render_messages(
    entries: list[dict[str, Any]],
    messages: list[Any],
    fmt: ToolFormat,
    tools: list[dict[str, Any]] | None,
    forced: str | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Template messages and extra template variables for a conversation with tools or tool history.

    `entries` are the template dicts of `messages` (schemas.ChatMessage) in the same order."""
    out: list[dict[str, Any]] = []
    for i, (entry, message) in enumerate(zip(entries, messages, strict=True)):
        entry = dict(entry)
        calls = message.tool_calls or []
        if message.role == "assistant" and calls:
            if fmt == "hermes":
                entry["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.function.name, "arguments": _arguments_object(c.function.arguments, i)},
                    }
                    for c in calls
                ]
            elif fmt == "deepseek":
                for c in calls:
                    _arguments_object(c.function.arguments, i)
                entry["content"] = None  # the template writes the calls only for content none
                entry["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.function.name, "arguments": c.function.arguments},
                    }
                    for c in calls
                ]
            else:
                blocks = [
                    f"{CALL_OPEN}\n"
                    + json.dumps(
                        {"name": c.function.name, "arguments": _arguments_object(c.function.arguments, i)},
                        ensure_ascii=False,
                    )
                    + f"\n{CALL_CLOSE}"
                    for c in calls
                ]
                entry["content"] = "\n".join([entry.get("content") or "", *blocks]).strip()
        elif message.role == "tool":
            if fmt == "generic":
                entry = {"role": "user", "content": f"<tool_response>\n{entry.get('content') or ''}\n</tool_response>"}
            elif message.tool_call_id:
                entry["tool_call_id"] = message.tool_call_id
        out.append(entry)
    extra: dict[str, Any] = {}
    if tools:
        if fmt == "hermes":
            extra["tools"] = tools
        else:
            text = instructions(tools, forced)
            if out and out[0].get("role") == "system":
                out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{text}".strip()}
            else:
                out.insert(0, {"role": "system", "content": text})
    return out, extra


def _call(name: str, arguments: Any) -> ToolCall:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=args))


def parse_tool_calls(text: str, setup: ToolSetup) -> tuple[str, list[ToolCall]]:
    """(content left outside the calls, calls) from a model's answer. Blocks that do not parse, or
    name a function that was not offered, stay in the content."""
    calls: list[ToolCall] = []
    spans: list[tuple[int, int]] = []
    for match in _HERMES_CALL.finditer(text):
        try:
            obj = json.loads(match.group(1))
        except ValueError:
            continue
        if not isinstance(obj, dict) or obj.get("name") not in setup.names:
            continue
        arguments = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                continue
        if not isinstance(arguments, dict):
            continue
        calls.append(_call(obj["name"], arguments))
        spans.append(match.span())
    for match in _DS_CALL.finditer(text):
        name, raw = match.group(1).strip(), match.group(2)
        try:
            arguments = json.loads(raw)
        except ValueError:
            continue
        if name not in setup.names or not isinstance(arguments, dict):
            continue
        calls.append(_call(name, arguments))
        spans.append(match.span())
    if not calls:
        return text, []
    spans.sort()
    order = sorted(range(len(calls)), key=lambda k: spans[k][0])
    calls = [calls[k] for k in order]
    content, last = [], 0
    for start, end in spans:
        content.append(text[last:start])
        last = end
    content.append(text[last:])
    rest = _DS_WRAPPERS.sub("", "".join(content)).strip()
    if not setup.parallel:
        calls = calls[:1]
    return rest, calls


class ToolStream:
    """Streams the content of an answer that may hold tool calls: text before the first call marker
    goes out at once (less a tail that could be the start of a marker); from the marker on it is held
    and parsed when the answer ends."""

    def __init__(self, setup: ToolSetup) -> None:
        self.setup = setup
        self.held = ""
        self.sent = ""  # the content sent so far
        self.in_calls = False

    def push(self, text: str) -> str:
        self.held += text
        if self.in_calls:
            return ""
        found = [i for i in (self.held.find(m) for m in MARKERS) if i >= 0]
        if found:
            at = min(found)
            out, self.held = self.held[:at], self.held[at:]
            self.in_calls = True
            self.sent += out
            return out
        keep = 0
        for marker in MARKERS:
            for k in range(min(len(marker) - 1, len(self.held)), 0, -1):
                if self.held.endswith(marker[:k]):
                    keep = max(keep, k)
                    break
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(self.held) - keep :]
        self.sent += out
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(the rest of the content to send, the calls)."""
        held, self.held = self.held, ""
        rest, calls = parse_tool_calls(held, self.setup) if self.in_calls else (held, [])
        self.sent += rest
        return rest, calls


def forced_grammar(tools: list[dict[str, Any]], name: str | None, parallel: bool = False) -> str:
    """GBNF for one `<tool_call>` block calling `name` (or any of `tools` when None) with arguments
    that validate against the function's `parameters`; with `parallel` (and no `name`), 1 to
    MAX_FORCED_CALLS such blocks, one per line, so the model may stop after any of them."""
    alternatives = []
    defs: dict[str, dict[str, Any]] = {"$defs": {}, "definitions": {}}
    for i, tool in enumerate(tools):
        function = tool["function"]
        if name is not None and function["name"] != name:
            continue
        params = dict(function.get("parameters") or {"type": "object"})
        for key in defs:  # local references ("#/$defs/x") resolve against the root of the combined schema
            if isinstance(params.get(key), dict):
                defs[key].update(params.pop(key))
        alternatives.append(
            (
                i,
                {
                    "type": "object",
                    "properties": {"name": {"const": function["name"]}, "arguments": params},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                },
            )
        )
    for i, tool in enumerate(tools):  # each schema is checked on its own, so the error names its tool
        if name is None or tool["function"]["name"] == name:
            schema_grammar(
                tool["function"].get("parameters") or {"type": "object"}, (f"tools[{i}].function.parameters", "tools")
            )
    schema = alternatives[0][1] if len(alternatives) == 1 else {"anyOf": [a for _, a in alternatives]}
    schema = {**schema, **{k: v for k, v in defs.items() if v}}
    body = schema_grammar(schema, ("tools", "tools"))
    body = re.sub(r"^root ::=", "tool-call ::=", body, flags=re.MULTILINE)
    block = 'ds-call-block ::= "<tool_call>\\n" tool-call "\\n</tool_call>"\n'
    if parallel and name is None:
        root = f'root ::= ds-call-block ("\\n" ds-call-block){{0,{MAX_FORCED_CALLS - 1}}}\n'
    else:
        root = "root ::= ds-call-block\n"
    return root + block + body
