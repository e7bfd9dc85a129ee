"""Structured logs: one JSON object per line (`DS_LOG_FORMAT=json`) or readable lines (`console`).

Every line of a request carries its context: `request_id` (the API's request-id middleware puts it on
each record), plus the fields bound with `bind_log_fields` (key_id, route, status, latency_ms,
tokens, completion_id: the engine's own lines name a choice `<completion id>-<index>`). The HTTP
middleware opens one context per request (`request_log_scope`); code deeper in the request adds to
it, and Uvicorn's access line, written when the response starts, sees it all.

Prompt and completion text never reach a line unless `DS_LOG_PROMPTS=true`: the fields named in
`PROMPT_FIELDS` are dropped by the formatter, and query strings are cut from access-log paths.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import logging.config
import traceback
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from deepseek_serve.config import Settings

# The request's fields; a mutable dict so what inner code binds is seen by the outer middleware.
_fields_var: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("log_fields", default=None)

PROMPT_FIELDS = frozenset({"prompt", "prompt_text", "messages", "completion", "completion_text", "content", "input"})
# attributes every LogRecord has; anything else on a record came from `extra=`
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "request_id",
    "color_message",
}
_ACCESS_LOGGER = "uvicorn.access"


def bind_log_fields(**fields: Any) -> None:
    """Add fields (key_id=..., tokens=...) to every later log line of the current request.

    Outside a request (no `request_log_scope`) this does nothing.
    """
    current = _fields_var.get()
    if current is not None:
        current.update({k: v for k, v in fields.items() if v is not None})


def log_fields() -> dict[str, Any]:
    """A copy of the current request's bound fields (empty outside a request)."""
    current = _fields_var.get()
    return dict(current) if current else {}


@contextlib.contextmanager
def request_log_scope(**fields: Any) -> Iterator[dict[str, Any]]:
    """Open a fresh field set for one request; yields the live dict."""
    current: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
    token = _fields_var.set(current)
    try:
        yield current
    finally:
        _fields_var.reset(token)


def _access_fields(record: logging.LogRecord) -> dict[str, Any] | None:
    """Uvicorn's access record args: (client_addr, method, full_path, http_version, status_code)."""
    args = record.args
    if record.name != _ACCESS_LOGGER or not isinstance(args, tuple) or len(args) != 5:
        return None
    client, method, full_path, http_version, status = args
    path = str(full_path).split("?", 1)[0]  # query strings may carry user text or secrets
    return {
        "message": f"{method} {path} HTTP/{http_version} {status}",
        "client": str(client),
        "method": str(method),
        "path": path,
        "status": status,
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the request's context, extras."""

    def __init__(self, log_prompts: bool = False) -> None:
        super().__init__()
        self.log_prompts = log_prompts

    def to_dict(self, record: logging.LogRecord) -> dict[str, Any]:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        access = _access_fields(record)
        out["message"] = access.pop("message") if access else record.getMessage()
        request_id = getattr(record, "request_id", None)
        if request_id and request_id != "-":
            out["request_id"] = request_id
        out.update(log_fields())
        if access:
            out.update(access)
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                out[key] = value
        if not self.log_prompts:
            for key in PROMPT_FIELDS.intersection(out):
                del out[key]
        if record.exc_info:
            out["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            out["exc"] = record.exc_text
        return out

    def format(self, record: logging.LogRecord) -> str:
        return orjson.dumps(self.to_dict(record), default=str).decode()


class ConsoleFormatter(JsonFormatter):
    """`time level logger [request_id] message key=value ...` for people at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        data = self.to_dict(record)
        head = f"{data.pop('time')} {data.pop('level').upper():<7} {data.pop('logger')}"
        request_id = data.pop("request_id", None)
        message = data.pop("message")
        exc = data.pop("exc", None)
        line = f"{head} [{request_id}] {message}" if request_id else f"{head} {message}"
        if data:
            line += " " + " ".join(f"{k}={v}" for k, v in data.items())
        return f"{line}\n{exc}" if exc else line


def _formatter_spec(settings: Settings) -> dict[str, Any]:
    cls = JsonFormatter if settings.log_format == "json" else ConsoleFormatter
    return {"()": f"{cls.__module__}.{cls.__qualname__}", "log_prompts": settings.log_prompts}


def uvicorn_log_config(settings: Settings) -> dict[str, Any]:
    """A `logging.config.dictConfig` dict for `uvicorn.run(log_config=...)`: Uvicorn's error and access
    loggers and the root logger all write through one stderr handler in `settings.log_format`.

    Uvicorn applies it in every worker process, so multi-worker servers log the same way.
    """
    level = settings.log_level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": _formatter_spec(settings)},
        "handlers": {
            "default": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
        },
        "loggers": {
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": "INFO", "propagate": True},
        },
        "root": {"handlers": ["default"], "level": level},
    }


def configure_logging(settings: Settings) -> None:
    """Route every logger (Uvicorn's included) through one stderr handler in `settings.log_format`.

    Idempotent; for commands that do not start Uvicorn, and for Uvicorn runs without `log_config`.
    """
    logging.config.dictConfig(uvicorn_log_config(settings))
    logging.captureWarnings(True)
