"""serving/failures.py: each failure's status, OpenAI error body and Retry-After."""

from __future__ import annotations

import pytest

from deepseek_serve.engine.errors import (
    ContextLengthError,
    DeadlineExceededError,
    EngineError,
    EngineStoppedError,
    QueueFullError,
)
from deepseek_serve.serving.failures import (
    body_too_large,
    from_engine_error,
    from_finish_reason,
    from_validation_errors,
)


def test_engine_errors_map_to_status_code_and_retry_after() -> None:
    context = from_engine_error(ContextLengthError(4000, 200, 4096))
    assert (context.status, context.code) == (400, "context_length_exceeded")
    full = from_engine_error(QueueFullError(64, retry_after_s=2.2))
    assert (full.status, full.type, full.code, full.headers["Retry-After"]) == (
        429,
        "server_overloaded",
        "queue_full",
        "3",
    )
    stopped = from_engine_error(EngineStoppedError("stopping"))
    assert (stopped.status, stopped.code, stopped.headers["Retry-After"]) == (503, "engine_unavailable", "5")
    assert from_engine_error(DeadlineExceededError("late")).status == 504
    unknown = from_engine_error(EngineError("secret detail"))
    assert unknown.status == 500 and "secret detail" not in unknown.message


@pytest.mark.parametrize(
    ("reason", "status", "code", "retry_after"),
    [
        ("timeout", 504, "timeout", None),
        ("abort", 503, "engine_unavailable", "5"),
        ("error", 500, "internal_error", None),
    ],
)
def test_a_failed_generation_maps_by_finish_reason(
    reason: str, status: int, code: str, retry_after: str | None
) -> None:
    err = from_finish_reason(reason, 30.0)
    assert err is not None
    assert (err.status, err.code, err.headers.get("Retry-After")) == (status, code, retry_after)
    assert err.body()["error"]["code"] == code


@pytest.mark.parametrize("reason", ["stop", "length", "tool_calls", None])
def test_a_finished_generation_is_no_failure(reason: str | None) -> None:
    assert from_finish_reason(reason, 30.0) is None


def test_timeout_message_names_the_deadline() -> None:
    err = from_finish_reason("timeout", 2.5)
    assert err is not None and "2.5s" in err.message


def test_body_too_large_closes_the_connection() -> None:
    err = body_too_large(4096)
    assert err.status == 413 and err.headers == {"Connection": "close"}
    assert err.body() == {
        "error": {
            "message": "Request body too large: the limit is 4096 bytes.",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_too_large",
        }
    }


def test_validation_errors_name_the_field() -> None:
    err = from_validation_errors([{"type": "missing", "loc": ("body", "messages", 0, "role"), "msg": "Field required"}])
    assert (err.status, err.param, err.code) == (400, "messages[0].role", "missing_required_parameter")
