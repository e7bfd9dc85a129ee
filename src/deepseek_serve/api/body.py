"""JSON request bodies for the generation routes: parsed fast, and refused by size before validation.

`LimitedBodyRoute` (a FastAPI route class) gives its routes a request whose `json()`:

- parses with orjson (several times faster than the stdlib on large bodies, and bounded nesting);
  a body orjson refuses is parsed again by the stdlib, whose semantics FastAPI documents (lone
  surrogate escapes, NaN, integers beyond 64 bits), so such values still reach validation and get a
  400 naming their field;
- checks the lengths of the top-level lists named in `LIST_LIMITS` before pydantic validates a
  single item. A large body is counted before it is parsed: msgspec decodes it into a struct holding
  one empty, untracked object per message, several times cheaper than orjson building 60,000 dicts,
  so a 2 MB body of 60,000 messages holds the event loop for a few ms and is refused unparsed
  (validating, templating and tokenizing it first would take about a minute).

A refusal is an `ApiError` (OpenAI's error shape, the field named) carried through FastAPI's body
parsing as an HTTP exception (`BodyRefused`), which the error handlers unwrap.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
import orjson
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from deepseek_serve.config import Settings
from deepseek_serve.serving.failures import ApiError

# top-level list field -> the setting bounding its length
LIST_LIMITS: dict[str, Callable[[Settings], int]] = {
    "messages": lambda s: s.max_messages,
}
# bodies from this size on are counted (`count_lists`) before they are parsed
COUNT_FROM_BYTES = 64 * 1024


class _Item(msgspec.Struct, gc=False):
    """Any JSON object, its fields skipped."""


class _Lists(msgspec.Struct, gc=False):
    messages: list[_Item] = []


_COUNTER = msgspec.json.Decoder(_Lists)


class BodyRefused(StarletteHTTPException):
    """An `ApiError` raised while the body is parsed (FastAPI lets only HTTP exceptions through)."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.status, error.message)
        self.api_error = error


def parse_json(body: bytes) -> Any:
    """orjson, else the stdlib for what orjson refuses (raises json.JSONDecodeError when neither parses)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def _refuse(name: str, count: int, limit: int) -> BodyRefused:
    message = f"Invalid value for '{name}': {count} items; at most {limit} are allowed."
    return BodyRefused(ApiError(400, message, "invalid_request_error", name, "invalid_value"))


def count_lists(body: bytes, settings: Settings) -> None:
    """Refuse a body whose lists are too long without parsing it. A body this counter cannot read
    (not an object, items that are not objects, invalid JSON, nesting too deep) is left to the parser
    and validation."""
    try:
        counted = _COUNTER.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return
    for name, limit_of in LIST_LIMITS.items():
        count, limit = len(getattr(counted, name)), limit_of(settings)
        if count > limit:
            raise _refuse(name, count, limit)


def check_lists(data: Any, settings: Settings) -> None:
    if not isinstance(data, dict):
        return
    for name, limit_of in LIST_LIMITS.items():
        value = data.get(name)
        if isinstance(value, list):
            limit = limit_of(settings)
            if len(value) > limit:
                raise _refuse(name, len(value), limit)


class _LimitedRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            services = getattr(self.app.state, "services", None)
            if services is not None and len(body) >= COUNT_FROM_BYTES:
                count_lists(body, services.settings)
            data = parse_json(body)
            if services is not None:
                check_lists(data, services.settings)
            self._json = data
        return self._json


class LimitedBodyRoute(APIRoute):
    """A route whose JSON body is parsed by `parse_json` and size-checked by `check_lists`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def limited(request: Request) -> Response:
            return await handler(_LimitedRequest(request.scope, request.receive))

        return limited
