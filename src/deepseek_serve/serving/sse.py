"""Server-sent-events framing shared by the streaming answers and the response-cache replay."""

from __future__ import annotations

from pydantic import BaseModel

# JSON allows U+0085, U+2028 and U+2029 raw inside strings, but readers that split a stream with
# str.splitlines semantics (httpx's iter_lines, for one) cut an event there; escaped, the JSON is the
# same. These UTF-8 byte sequences can only occur inside JSON strings.
_RAW_LINE_BREAKS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"  # a comment line: keeps proxies from timing out a queued stream
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def escape_line_breaks(json_bytes: bytes) -> bytes:
    """JSON text with U+0085, U+2028 and U+2029 escaped (the same JSON)."""
    for raw, escaped in _RAW_LINE_BREAKS:
        if raw in json_bytes:
            json_bytes = json_bytes.replace(raw, escaped)
    return json_bytes


def sse_event(json_bytes: bytes) -> bytes:
    """One `data:` event carrying a JSON document."""
    return b"data: " + escape_line_breaks(json_bytes) + b"\n\n"


def model_event(payload: BaseModel) -> bytes:
    """One `data:` event carrying a response model (a chunk, or the usage-only completion)."""
    return sse_event(payload.model_dump_json().encode())
