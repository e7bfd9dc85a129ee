"""A /v1/completions body as a `GenerationPlan`: a string, a list of strings, token ids or lists of
token ids; each prompt gets `n` choices (index = prompt_index * n + i)."""

from __future__ import annotations

from deepseek_serve.engine.errors import ContextLengthError
from deepseek_serve.serving.checks import check_body, check_model
from deepseek_serve.serving.failures import ApiError
from deepseek_serve.serving.plan import GenerationPlan, PromptInput, new_completion_id, sampling_params
from deepseek_serve.serving.prompts import tokenize
from deepseek_serve.serving.schemas import CompletionRequest
from deepseek_serve.serving.services import Services

MAX_PROMPTS = 64
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint


def _unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, f"Unsupported value for '{param}': {why}", "invalid_request_error", param, "unsupported_value")


async def plan_completion(services: Services, body: CompletionRequest) -> GenerationPlan:
    """The plan of a text completion. Raises a 400/404 naming the field for what cannot be served."""
    model = check_model(services, body.model)
    if body.suffix:
        raise _unsupported("suffix", "insertion (suffix) is not supported by this model")
    if body.best_of is not None and body.best_of != body.n:
        raise _unsupported("best_of", "best_of must equal n")
    if body.echo and body.logprobs is not None:
        raise _unsupported("logprobs", "logprobs together with echo (prompt logprobs) are not supported")
    raw = body.prompt
    prompts: list[PromptInput] = []
    if isinstance(raw, str):
        items: list[str | list[int]] = [raw]
    elif raw and isinstance(raw[0], int):
        items = [list(raw)]
    else:
        items = list(raw)  # type: ignore[arg-type]
    if len(items) > MAX_PROMPTS:
        raise ApiError(
            400,
            f"Invalid value for 'prompt': at most {MAX_PROMPTS} prompts per request.",
            "invalid_request_error",
            "prompt",
            "invalid_value",
        )
    check_body(services, body, num_prompts=len(items))
    max_len = services.engine.model_info.max_model_len
    for item in items:
        if isinstance(item, str):
            prompts.append(PromptInput(await tokenize(services, item, add_special_tokens=True), item))
        else:
            if not item:
                raise ApiError(
                    400,
                    "Invalid value for 'prompt': a token list is empty.",
                    "invalid_request_error",
                    "prompt",
                    "invalid_value",
                )
            if len(item) >= max_len:  # before detokenizing, which walks the whole list
                error = ContextLengthError(len(item), body.max_tokens or 1, max_len)
                error.param = "prompt"
                raise error
            prompts.append(PromptInput(tuple(item), services.engine.detokenize(item)))
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    logprobs = body.logprobs is not None
    params = sampling_params(body, max_tokens, logprobs, body.logprobs or 0, services.engine.model_info.sampling)
    return GenerationPlan(
        endpoint="completions",
        completion_id=new_completion_id("cmpl"),
        model=model,
        prompts=tuple(prompts),
        params=params,
        n=body.n,
        stream=bool(body.stream),
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        echo=bool(body.echo),
        use_cache=body.cache is not False,
    )
