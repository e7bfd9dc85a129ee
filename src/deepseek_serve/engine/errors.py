"""Typed engine errors. The API maps each one, in one place, to an OpenAI error body and status."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises to callers."""


class InvalidRequestError(EngineError):
    """The request itself is wrong (bad sampling value, empty prompt...). `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """prompt + max_tokens does not fit the model's context; refused before any work."""

    def __init__(self, prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
            f"completion). Please reduce the length of the prompt or max_tokens.",
            param="messages",
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len


class QueueFullError(EngineError):
    """The waiting queue is full: the client should retry later (HTTP 429)."""

    def __init__(self, queue_size: int, retry_after_s: float = 1.0) -> None:
        super().__init__(f"The server is overloaded: {queue_size} requests are already waiting. Retry later.")
        self.queue_size = queue_size
        self.retry_after_s = retry_after_s


class DeadlineExceededError(EngineError):
    """The request ran past its deadline and was aborted."""


class EngineStoppedError(EngineError):
    """The engine is stopping or stopped and accepts no new work."""
