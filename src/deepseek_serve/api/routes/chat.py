"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from deepseek_serve.api.answers import to_response
from deepseek_serve.api.body import LimitedBodyRoute
from deepseek_serve.api.deps import InferenceDep, ServicesDep
from deepseek_serve.serving.chat import plan_chat
from deepseek_serve.serving.generate import serve_generation
from deepseek_serve.serving.schemas import ChatCompletion, ChatCompletionRequest

router = APIRouter(prefix="/v1", tags=["chat"], route_class=LimitedBodyRoute)


@router.post(
    "/chat/completions", response_model=ChatCompletion, responses={200: {"content": {"text/event-stream": {}}}}
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, services: ServicesDep, principal: InferenceDep
) -> Response:
    """OpenAI chat completions (JSON or SSE with `stream: true`), with DeepSeek's `reasoning_content`
    and usage fields. `conversation_id` (extension) prepends the stored history of that conversation."""
    plan = await plan_chat(services, principal, body)
    return to_response(await serve_generation(services, principal, plan, request.receive))
