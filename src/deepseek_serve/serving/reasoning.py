"""DeepSeek-R1 style reasoning: split `<think>...</think>` out of generated text.

`ReasoningSplitter` is streaming-safe: text arrives in arbitrary deltas, so a tag may be cut
anywhere; the splitter holds back a tail that could still become a tag and releases it once it
cannot (or on `flush`). When the chat template already ends in `<think>` (`prefilled=True`) the
output holds only the closing `</think>`, so the splitter starts inside the reasoning.
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"


class Split(NamedTuple):
    reasoning: str
    content: str


class _State(enum.Enum):
    START = "start"  # nothing decided: the output may open with <think>
    REASONING_START = "reasoning_start"  # inside, nothing emitted yet (leading newlines dropped)
    REASONING = "reasoning"
    AFTER = "after"  # just closed: blank lines before the answer are dropped
    CONTENT = "content"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningSplitter:
    def __init__(self, prefilled: bool = False) -> None:
        self._state = _State.REASONING_START if prefilled else _State.START
        self._held = ""
        self.reasoning_text = ""  # everything emitted as reasoning so far
        self.content_text = ""

    @property
    def in_reasoning(self) -> bool:
        return self._state in (_State.REASONING_START, _State.REASONING)

    def push(self, text: str) -> Split:
        """Feed one delta; returns the reasoning and content that are final so far."""
        buf = self._held + text
        self._held = ""
        reasoning: list[str] = []
        content: list[str] = []
        while buf:
            if self._state is _State.START:
                stripped = buf.lstrip()
                if stripped.startswith(OPEN_TAG):
                    buf = stripped[len(OPEN_TAG) :]
                    self._state = _State.REASONING_START
                elif OPEN_TAG.startswith(stripped):
                    self._held = buf  # could still become <think>
                    buf = ""
                else:
                    self._state = _State.CONTENT
            elif self._state is _State.REASONING_START:
                buf = buf.lstrip("\n")
                if buf:
                    self._state = _State.REASONING
            elif self._state is _State.REASONING:
                end = buf.find(CLOSE_TAG)
                if end >= 0:
                    reasoning.append(buf[:end])
                    buf = buf[end + len(CLOSE_TAG) :]
                    self._state = _State.AFTER
                else:
                    keep = _partial_suffix(buf, CLOSE_TAG)
                    reasoning.append(buf[: len(buf) - keep])
                    self._held = buf[len(buf) - keep :]
                    buf = ""
            elif self._state is _State.AFTER:
                buf = buf.lstrip()
                if buf:
                    self._state = _State.CONTENT
            else:
                content.append(buf)
                buf = ""
        out = Split("".join(reasoning), "".join(content))
        self.reasoning_text += out.reasoning
        self.content_text += out.content
        return out

    def flush(self) -> Split:
        """The output ended: release what was held back."""
        held, self._held = self._held, ""
        if not held:
            return Split("", "")
        out = Split(held, "") if self.in_reasoning else Split("", held)
        self.reasoning_text += out.reasoning
        self.content_text += out.content
        return out


def split_reasoning(text: str, prefilled: bool = False) -> Split:
    """Split a whole output at once."""
    splitter = ReasoningSplitter(prefilled)
    first = splitter.push(text)
    last = splitter.flush()
    return Split(first.reasoning + last.reasoning, first.content + last.content)


def prepare_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Chat messages (schemas.ChatMessage) -> template dicts. Reasoning sent back in assistant
    messages is dropped (DeepSeek's contract: it is never fed to the model again); text parts are
    joined; `developer` is treated as `system`."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = "system" if message.role == "developer" else message.role
        entry: dict[str, Any] = {"role": role, "content": message.text()}
        if role == "assistant":
            entry["content"] = _strip_think(entry["content"])
        if message.name:
            entry["name"] = message.name
        out.append(entry)
    return out


def _strip_think(text: str) -> str:
    """Assistant text sent back may still carry a `<think>` block: keep only the answer."""
    if CLOSE_TAG in text:
        return text.split(CLOSE_TAG, 1)[1].lstrip()
    return text
