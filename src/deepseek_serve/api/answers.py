"""A serving `Answer` as the HTTP response that sends it."""

from __future__ import annotations

from starlette.responses import Response, StreamingResponse

from deepseek_serve.serving.generate import Answer


def to_response(answer: Answer) -> Response:
    if answer.events is not None:
        return StreamingResponse(answer.events, media_type=answer.media_type, headers=answer.headers)
    return Response(answer.body, media_type=answer.media_type, headers=answer.headers)
