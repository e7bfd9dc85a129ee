"""Structured logs: the formatters, per-request fields, Uvicorn's access records, prompt redaction."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from deepseek_serve.observability.logs import (
    ConsoleFormatter,
    JsonFormatter,
    bind_log_fields,
    configure_logging,
    log_fields,
    request_log_scope,
    uvicorn_log_config,
)
from tests.support.settings import make_settings


def record(name: str, msg: str, *args: object, **extra: object) -> logging.LogRecord:
    return logging.getLogger(name).makeRecord(name, logging.INFO, __file__, 1, msg, args, None, extra=extra or None)


def test_json_line_carries_time_level_logger_message_and_extras() -> None:
    line = JsonFormatter().format(record("deepseek_serve.x", "loaded %s in %.1fs", "model", 1.25, tokens=12))
    assert "\n" not in line
    data = json.loads(line)
    assert data["level"] == "info"
    assert data["logger"] == "deepseek_serve.x"
    assert data["message"] == "loaded model in 1.2s"
    assert data["tokens"] == 12
    assert data["time"].endswith("Z") and "T" in data["time"]


def test_request_fields_reach_every_line_of_the_request_only() -> None:
    fmt = JsonFormatter()
    with request_log_scope(request_id="req-1"):
        bind_log_fields(key_id="key_42", route="/v1/chat/completions", tokens=None)
        inside = json.loads(fmt.format(record("a", "inside")))
        assert log_fields() == {"request_id": "req-1", "key_id": "key_42", "route": "/v1/chat/completions"}
    outside = json.loads(fmt.format(record("a", "outside")))
    bind_log_fields(key_id="ignored")  # outside a request: no effect
    assert inside["request_id"] == "req-1" and inside["key_id"] == "key_42"
    assert "tokens" not in inside
    assert "key_id" not in outside and "request_id" not in outside
    assert log_fields() == {}


def test_prompt_text_is_dropped_unless_configured() -> None:
    rec = record("deepseek_serve.api", "request", prompt="my secret question", messages=[{"content": "x"}], tokens=3)
    hidden = json.loads(JsonFormatter(log_prompts=False).format(rec))
    shown = json.loads(JsonFormatter(log_prompts=True).format(rec))
    assert "prompt" not in hidden and "messages" not in hidden and hidden["tokens"] == 3
    assert shown["prompt"] == "my secret question"


def test_uvicorn_access_record_becomes_structured_without_query_string() -> None:
    rec = record(
        "uvicorn.access",
        '%s - "%s %s HTTP/%s" %d',
        "127.0.0.1:5000",
        "GET",
        "/v1/models/abc?api_key=sk-secret",
        "1.1",
        404,
    )
    with request_log_scope(request_id="req-9", route="/v1/models/{model_id}", latency_ms=3.5):
        data = json.loads(JsonFormatter().format(rec))
    assert data["message"] == "GET /v1/models/abc HTTP/1.1 404"
    assert data["status"] == 404 and data["method"] == "GET" and data["path"] == "/v1/models/abc"
    assert data["route"] == "/v1/models/{model_id}" and data["latency_ms"] == 3.5
    assert "sk-secret" not in json.dumps(data)


def test_exceptions_are_one_json_line_with_the_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.getLogger("x").makeRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exc"]


def test_console_format_is_one_readable_line() -> None:
    with request_log_scope(request_id="req-5", status=200):
        line = ConsoleFormatter().format(record("deepseek_serve.api", "done"))
    assert "INFO" in line and "[req-5] done" in line and "status=200" in line


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_configure_logging_routes_uvicorn_loggers_through_one_handler(
    fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging(make_settings(tmp_path, log_format=fmt, log_level="info"))
        logging.getLogger("uvicorn.error").info("Started server process [1]")
        access = logging.getLogger("uvicorn.access")
        access.info('%s - "%s %s HTTP/%s" %d', "1.2.3.4:1", "GET", "/health", "1.1", 200)
        logging.getLogger("deepseek_serve.test").debug("hidden at info")
        lines = capsys.readouterr().err.strip().splitlines()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert len(lines) == 2
    if fmt == "json":
        assert [json.loads(line)["logger"] for line in lines] == ["uvicorn.error", "uvicorn.access"]
    else:
        assert "uvicorn.access GET /health HTTP/1.1 200" in lines[1]


def test_uvicorn_log_config_passes_log_prompts_to_the_formatter(tmp_path: Path) -> None:
    config = uvicorn_log_config(make_settings(tmp_path, log_format="json", log_prompts=True))
    formatter = config["formatters"]["default"]
    assert formatter["()"].endswith("JsonFormatter") and formatter["log_prompts"] is True
    assert config["loggers"]["uvicorn.access"]["propagate"] is True
    assert config["root"]["handlers"] == ["default"]
