"""SSE parsing and OpenAI stream-chunk decoding of the load generator."""

from __future__ import annotations

import json

import pytest

from deepseek_serve.bench.sse import SSEParser, error_message, parse_chunk


def feed_all(parser: SSEParser, parts: list[bytes]) -> list[str]:
    return [event.data for part in parts for event in parser.feed(part)]


def test_events_split_at_every_byte_give_the_same_events() -> None:
    stream = (
        'data: {"a": 1}\n\n'
        ": keep-alive comment\n\n"
        "event: ping\ndata: x\n\n"
        "data: line one\ndata: line two\n\n"
        "data:no-space\n\n"
        "data: caf\u00e9 \u4e2d\u6587 \U0001f600\n\n"
        "data: [DONE]\n\n"
    ).encode()
    whole = feed_all(SSEParser(), [stream])
    bytewise = feed_all(SSEParser(), [stream[i : i + 1] for i in range(len(stream))])
    assert (
        whole
        == bytewise
        == [
            '{"a": 1}',
            "x",
            "line one\nline two",
            "no-space",
            "caf\u00e9 \u4e2d\u6587 \U0001f600",
            "[DONE]",
        ]
    )


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_all_line_endings(newline: str) -> None:
    stream = f"data: one{newline}{newline}data: two{newline}{newline}".encode()
    assert feed_all(SSEParser(), [stream]) == ["one", "two"]
    # CRLF split between two reads must not end an extra (empty) line
    assert feed_all(SSEParser(), [stream[:9], stream[9:]]) == ["one", "two"]


def test_crlf_split_across_reads_keeps_multiline_data() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\ndata: b\r\n\r\n") != []
    parser = SSEParser()
    events = feed_all(parser, [b"data: a\r", b"\ndata: b\r\n\r\n"])
    assert events == ["a\nb"]


def test_event_type_id_and_unfinished_event() -> None:
    parser = SSEParser()
    events = parser.feed(b"\xef\xbb\xbfevent: update\nid: 7\ndata: hi\n\ndata: partial")
    assert [(e.event, e.id, e.data) for e in events] == [("update", "7", "hi")]
    # an event is complete only at its blank line
    assert parser.feed(b"\n") == []
    assert [e.data for e in parser.feed(b"\n")] == ["partial"]


def test_chat_chunk_content_reasoning_and_finish() -> None:
    role = parse_chunk(
        json.dumps(
            {
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
            }
        )
    )
    assert role.text == "" and role.error is None
    chunk = parse_chunk(
        json.dumps({"choices": [{"delta": {"reasoning_content": "think ", "content": "Hi"}, "finish_reason": None}]})
    )
    assert chunk.text == "think Hi"
    last = parse_chunk(json.dumps({"choices": [{"delta": {}, "finish_reason": "length"}]}))
    assert last.finish_reason == "length" and last.text == ""


def test_completion_chunk_and_usage_chunk() -> None:
    chunk = parse_chunk(json.dumps({"object": "text_completion", "choices": [{"text": " world"}]}))
    assert chunk.text == " world"
    usage = parse_chunk(
        json.dumps({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}})
    )
    assert usage.usage is not None
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (12, 5)
    # a usage object with no completion count is ignored, not a crash
    assert parse_chunk(json.dumps({"choices": [], "usage": {"prompt_tokens": 3}})).usage is None


def test_error_chunks_and_bodies() -> None:
    assert parse_chunk('{"error": {"message": "boom", "type": "server_error"}}').error == "boom"
    assert parse_chunk("not json").error is not None
    assert parse_chunk("[1, 2]").error is not None
    assert error_message(b'{"error": {"message": "slow down", "type": "rate_limit_error"}}') == "slow down"
    assert error_message(b'{"detail": "Not Found"}') == "Not Found"
    assert error_message(b"<html>bad gateway</html>") == "<html>bad gateway</html>"
