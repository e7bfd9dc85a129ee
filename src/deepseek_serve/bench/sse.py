"""Server-sent events: an incremental `text/event-stream` parser and OpenAI stream-chunk decoding.

`SSEParser` follows the WHATWG event-stream rules: lines end in LF, CRLF or CR; a blank line ends
an event; `:` starts a comment; `data` lines of one event are joined with LF; one space after the
colon is dropped. Bytes may be split anywhere, even inside a UTF-8 character.

`parse_chunk` reads one `data:` payload of an OpenAI stream (`chat.completion.chunk` or
`text_completion`) into a `StreamChunk`.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Any

import orjson

DONE = "[DONE]"


@dataclass(frozen=True)
class SSEEvent:
    data: str
    event: str = "message"
    id: str | None = None


class SSEParser:
    """Feed raw bytes as they arrive; get back the events completed so far."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._started = False
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        text = self._decoder.decode(chunk)
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        if not text:
            return []
        if self._pending_cr and text.startswith("\n"):
            # the CR that ended the previous chunk and this LF are one CRLF line end.
            text = text[1:]
        self._pending_cr = text.endswith("\r")
        self._buffer += text
        events: list[SSEEvent] = []
        lines = self._buffer.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self._buffer = lines.pop()  # the unfinished last line (may be "")
        for line in lines:
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None

    def _dispatch(self) -> SSEEvent | None:
        if not self._data:
            self._event = ""
            return None
        event = SSEEvent(data="\n".join(self._data), event=self._event or "message", id=self._id)
        self._data = []
        self._event = ""
        return event


@dataclass(frozen=True)
class StreamUsage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class StreamChunk:
    """What one stream chunk carries. `text` joins content and reasoning content of choice 0."""

    text: str = ""
    finish_reason: str | None = None
    usage: StreamUsage | None = None
    error: str | None = None


def parse_chunk(data: str) -> StreamChunk:
    """Decode one `data:` payload. Malformed JSON or an `error` object gives a chunk with `error` set."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return StreamChunk(error=f"malformed stream chunk: {data[:200]!r}")
    if not isinstance(obj, dict):
        return StreamChunk(error=f"unexpected stream chunk: {data[:200]!r}")
    if "error" in obj:
        return StreamChunk(error=_error_message(obj["error"]))
    usage = _usage(obj.get("usage"))
    choices = obj.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return StreamChunk(usage=usage)
    choice: dict[str, Any] = choices[0]
    if isinstance(choice.get("delta"), dict):
        delta = choice["delta"]
        text = (delta.get("reasoning_content") or "") + (delta.get("content") or "")
    else:
        text = choice.get("text") or ""
    return StreamChunk(text=text, finish_reason=choice.get("finish_reason"), usage=usage)


def error_message(body: bytes) -> str:
    """The message of an error response body (OpenAI shape or anything else), shortened."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:200].decode("utf-8", "replace")
    if isinstance(obj, dict) and "error" in obj:
        return _error_message(obj["error"])
    if isinstance(obj, dict) and "detail" in obj:
        return str(obj["detail"])[:200]
    return body[:200].decode("utf-8", "replace")


def _error_message(err: Any) -> str:
    if isinstance(err, dict):
        return str(err.get("message") or err)[:200]
    return str(err)[:200]


def _usage(raw: Any) -> StreamUsage | None:
    if not isinstance(raw, dict):
        return None
    try:
        return StreamUsage(int(raw.get("prompt_tokens") or 0), int(raw["completion_tokens"]))
    except (KeyError, TypeError, ValueError):
        return None
