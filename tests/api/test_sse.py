"""SSE framing: an event stays one line for readers that split with str.splitlines semantics."""

from __future__ import annotations

import json

import httpx
import orjson

from deepseek_serve.serving.sse import DONE, sse_event


def test_line_separators_inside_strings_are_escaped_and_the_json_is_unchanged() -> None:
    doc = {"text": "a\u2028b\u2029c\x85d 你好 🙂 \n\r\t", "n": 1}
    raw = orjson.dumps(doc)
    assert len(raw.decode().splitlines()) > 1  # orjson leaves U+0085/U+2028/U+2029 raw (valid JSON)
    event = sse_event(raw)
    lines = event.decode().splitlines()
    assert lines == [lines[0], ""] and lines[0].startswith("data: ")
    assert json.loads(lines[0][len("data: ") :]) == doc
    # httpx's line iterator (what the cut stream test reads with) sees one event line
    stream = httpx.Response(200, content=event + DONE)
    assert [line for line in stream.iter_lines() if line] == [lines[0], "data: [DONE]"]


def test_plain_payloads_are_framed_as_they_are() -> None:
    raw = orjson.dumps({"text": "hello"})
    assert sse_event(raw) == b"data: " + raw + b"\n\n"
