"""Slow and idle clients against a real `deepseek-serve serve` process, over raw sockets: idle
connections, trickled headers and bodies, oversized headers (api/http_protocol.py)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.server import ServeProcess

KEEPALIVE_S, HEADER_S, BODY_S, MAX_HEADER, SEND_S = 1.0, 1.5, 2.0, 8192, 2.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with ServeProcess(
        tmp_path_factory.mktemp("transport"),
        ready_path="/health/live",
        timeout_s=180,
        DS_AUTH="off",
        DS_LOG_LEVEL="warning",
        DS_RESPONSE_CACHE="false",
        DS_HTTP_KEEPALIVE_TIMEOUT_S=str(KEEPALIVE_S),
        DS_HTTP_HEADER_TIMEOUT_S=str(HEADER_S),
        DS_HTTP_BODY_TIMEOUT_S=str(BODY_S),
        DS_HTTP_MAX_HEADER_BYTES=str(MAX_HEADER),
        DS_HTTP_SEND_TIMEOUT_S=str(SEND_S),
    ) as proc:
        yield proc


def connect(server: ServeProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.settimeout(10)
    return sock


def read_until_closed(sock: socket.socket, limit_s: float = 10.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed (monotonic)."""
    data = b""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    else:
        raise AssertionError(f"the server kept the connection open for {limit_s}s; got {data[:200]!r}")
    return data, time.monotonic()


def trickle_until_closed(
    sock: socket.socket, pieces: Iterator[bytes], every_s: float, limit_s: float = 10.0
) -> tuple[bytes, float]:
    """Send one piece every `every_s` seconds until the server answers and closes."""
    sock.settimeout(every_s)
    data = b""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            sock.sendall(next(pieces))
        except (BrokenPipeError, ConnectionResetError):
            sock.settimeout(2)
            rest, closed = read_until_closed(sock, 2)
            return data + rest, closed
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data, time.monotonic()
        if not chunk:
            return data, time.monotonic()
        data += chunk
    raise AssertionError(f"connection still open after {limit_s}s of trickling")


def parse_response(raw: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, json.loads(body) if body else None


def assert_openai_error(raw: bytes, status: int, code: str) -> None:
    got, headers, body = parse_response(raw)
    assert got == status, raw[:300]
    assert headers["connection"] == "close" and headers["content-type"] == "application/json"
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code and body["error"]["message"]


def still_serving(server: ServeProcess) -> None:
    assert server.proc is not None and server.proc.poll() is None
    assert httpx.get(f"{server.url}/health/live", timeout=10).status_code == 200


def test_idle_connection_is_closed_after_the_keepalive_timeout(server: ServeProcess) -> None:
    with connect(server) as sock:
        opened = time.monotonic()
        data, closed = read_until_closed(sock)
    assert data == b""  # closed silently: there was no request to answer
    assert KEEPALIVE_S * 0.8 <= closed - opened <= KEEPALIVE_S + 3


def test_keepalive_connection_serves_requests_then_closes_when_idle(server: ServeProcess) -> None:
    request = f"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode()
    with connect(server) as sock:
        for _ in range(2):  # two requests on one connection, each within the idle window
            sock.sendall(request)
            raw = b""
            while b"\r\n\r\n" not in raw:
                raw += sock.recv(65536)
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            length = int(
                next(
                    v
                    for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")[1:])
                    if k.strip().lower() == b"content-length"
                )
            )
            while len(body) < length:  # the body may come in a later segment than the head
                body += sock.recv(65536)
            time.sleep(KEEPALIVE_S / 3)
        answered = time.monotonic()
        _, closed = read_until_closed(sock)
    assert closed - answered <= KEEPALIVE_S + 3


def test_trickled_headers_get_408_at_the_header_deadline(server: ServeProcess) -> None:
    head = f"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n".encode()
    pieces = iter([head] + [b"X-a: b\r\n"] * 1000)  # a header every 0.3 s, never the blank line
    with connect(server) as sock:
        started = time.monotonic()
        raw, closed = trickle_until_closed(sock, pieces, 0.3)
    assert_openai_error(raw, 408, "request_timeout")
    assert HEADER_S * 0.8 <= closed - started <= HEADER_S + 3
    still_serving(server)


def test_a_trickle_of_blank_lines_does_not_hold_a_connection(server: ServeProcess) -> None:
    with connect(server) as sock:
        started = time.monotonic()
        _, closed = trickle_until_closed(sock, iter([b"\r\n"] * 1000), 0.2)
    assert closed - started <= max(HEADER_S, KEEPALIVE_S) + 3


def test_trickled_body_gets_408_at_the_body_deadline(server: ServeProcess) -> None:
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        "Content-Type: application/json\r\nContent-Length: 4000\r\n\r\n"
    ).encode()
    with connect(server) as sock:
        sock.sendall(head)
        started = time.monotonic()
        raw, closed = trickle_until_closed(sock, iter([b" "] * 4000), 0.2)
    assert_openai_error(raw, 408, "request_timeout")
    assert BODY_S * 0.8 <= closed - started <= BODY_S + 3
    still_serving(server)
    assert "Traceback" not in server.stderr()


def test_oversized_headers_get_431(server: ServeProcess) -> None:
    one_big = f"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 1024 * 1024}\r\n\r\n".encode()
    many_small = (
        "GET /health/live HTTP/1.1\r\nHost: x\r\n" + "".join(f"X-H{i}: {'b' * 100}\r\n" for i in range(100)) + "\r\n"
    ).encode()
    long_url = f"GET /health/live?{'q' * 20_000} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    for request in (one_big, many_small, long_url):
        with connect(server) as sock:
            try:
                sock.sendall(request)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused before it was all sent; the answer is still readable
            raw, _ = read_until_closed(sock)
        assert_openai_error(raw, 431, "request_header_fields_too_large")
    still_serving(server)


def test_requests_within_the_limits_are_served(server: ServeProcess) -> None:
    model = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 2, "temperature": 0}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Content-Type: application/json\r\nX-Pad: {'p' * (MAX_HEADER // 2)}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with connect(server) as sock:
        # slow but within every deadline: the head in three pieces, the body in two
        for piece in (head[:20], head[20:200], head[200:], body[:10], body[10:]):
            sock.sendall(piece)
            time.sleep(0.25)
        raw, _ = read_until_closed(sock, 60)
    status, _, answer = parse_response(raw)
    assert status == 200, raw[:500]
    assert answer["object"] == "text_completion" and answer["usage"]["completion_tokens"] == 2


def test_a_malformed_request_gets_a_json_400(server: ServeProcess) -> None:
    with connect(server) as sock:
        sock.sendall(b"NOT HTTP AT ALL\x00\r\n\r\n")
        raw, _ = read_until_closed(sock)
    assert_openai_error(raw, 400, "invalid_http_request")


def test_a_client_that_stops_reading_is_dropped_and_its_generation_aborted(server: ServeProcess) -> None:
    model = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]
    # about 2.5 KB of SSE per token (20 top logprobs each): the buffers fill within a few dozen tokens
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": 1500,
            "ignore_eos": True,
            "stream": True,
            "logprobs": True,
            "top_logprobs": 20,
            "temperature": 0,
        }
    ).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    with sock:
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(
            (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
        )
        deadline = time.monotonic() + 120
        while "the client read nothing" not in server.stderr():  # and this client reads nothing
            assert time.monotonic() < deadline, "the server never dropped the stalled stream"
            time.sleep(0.5)
        while httpx.get(f"{server.url}/health", timeout=10).json()["num_running"] != 0:
            assert time.monotonic() < deadline, "the dropped stream's sequence kept running"
            time.sleep(0.2)
        received = 0
        try:
            while chunk := sock.recv(65536):  # what the buffers held, then the reset
                received += len(chunk)
        except ConnectionResetError:
            pass
    assert 0 < received < 1500 * 2500  # cut well before the end of the stream
    still_serving(server)
