"""POST /v1/completions (legacy text completions)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from deepseek_serve.api.answers import to_response
from deepseek_serve.api.body import LimitedBodyRoute
from deepseek_serve.api.deps import InferenceDep, ServicesDep
from deepseek_serve.serving.completions import plan_completion
from deepseek_serve.serving.generate import serve_generation
from deepseek_serve.serving.schemas import Completion, CompletionRequest

router = APIRouter(prefix="/v1", tags=["completions"], route_class=LimitedBodyRoute)


@router.post("/completions", response_model=Completion, responses={200: {"content": {"text/event-stream": {}}}})
async def create_completion(
    body: CompletionRequest, request: Request, services: ServicesDep, principal: InferenceDep
) -> Response:
    """OpenAI text completions: `prompt` is a string, a list of strings, token ids or lists of token ids;
    each prompt gets `n` choices (index = prompt_index * n + i). Streams with `stream: true`."""
    plan = await plan_completion(services, body)
    return to_response(await serve_generation(services, principal, plan, request.receive))
