"""Error answers on the FastAPI app: every exception becomes the OpenAI error body that
`serving/failures.py` maps it to, written by `error_response`.

No stack trace ever reaches a client: unexpected exceptions are logged with the request id and
answered with the generic 500.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from deepseek_serve.engine.errors import EngineError
from deepseek_serve.serving.failures import (
    ApiError,
    from_engine_error,
    from_http_status,
    from_validation_errors,
    internal_error,
)

logger = logging.getLogger(__name__)


def error_response(err: ApiError, extra_headers: Mapping[str, str] | None = None) -> Response:
    headers = {**err.headers, **(extra_headers or {})}
    return Response(orjson.dumps(err.body()), status_code=err.status, headers=headers, media_type="application/json")


async def unexpected_error(request: Request, exc: Exception) -> Response:
    """The generic 500 for an exception no handler knows; the traceback goes to the log only."""
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(internal_error())


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on `app`. Every error response goes through `error_response`."""

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def engine_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, EngineError)
        err = from_engine_error(exc)
        if err.status >= 500:
            logger.error("engine error: %s", exc)
        return error_response(err)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(from_validation_errors(exc.errors()))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        carried = getattr(exc, "api_error", None)  # a refusal raised while the body was read (api/body.py)
        if isinstance(carried, ApiError):
            return error_response(carried)
        err = from_http_status(
            exc.status_code, str(exc.detail), request.method, request.url.path, dict(exc.headers or {})
        )
        return error_response(err)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(EngineError, engine_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    # Starlette hands this one to its outermost ServerErrorMiddleware, outside our middleware; the
    # app's innermost `UnhandledErrorMiddleware` answers first, so a 500 keeps its request id and CORS.
    app.add_exception_handler(Exception, unexpected_error)
