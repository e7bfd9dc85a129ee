"""Speculative decoding with a draft model: the default 0.5B pack drafting for itself (the only pair of
packs of one tokenizer small enough for tests; the 1.5B/0.5B pair is measured by bench/speculative.py).
Greedy and seeded outputs equal the plain engine's, alone and batched, and the draft's guesses are
verified and counted."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from deepseek_serve.engine.async_engine import AsyncEngine
from deepseek_serve.engine.types import GenerationRequest, SamplingParams, StreamDelta
from tests.engine.test_engine import TOP_K, assert_same_sample_or_boundary_flip
from tests.support.engine import generate
from tests.support.settings import make_settings
from tests.test_real_weights import CACHE, PACK

pytestmark = pytest.mark.slow
_ids = itertools.count()

PROMPTS = (
    "Write a Python function that returns the n-th Fibonacci number.",
    "What is the capital of France? Answer in one sentence.",
    "List three prime numbers greater than 100.",
)


def _settings(tmp: object, **extra: object) -> object:
    return make_settings(
        tmp,  # type: ignore[arg-type]
        model=PACK.name,
        model_cache_dir=CACHE,
        max_batch_size=4,
        context_length=4096,
        prefix_cache=False,
        **extra,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engines(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:
    from deepseek_serve.models.packs import pull_pack

    pull_pack(PACK, CACHE, progress=False)
    draft = AsyncEngine.from_settings(
        _settings(
            tmp_path_factory.mktemp("draft"),
            speculative="draft",
            draft_model=PACK.name,
            speculative_k=4,
            speculative_max_batch=4,
        )  # type: ignore[arg-type]
    )
    plain = AsyncEngine.from_settings(_settings(tmp_path_factory.mktemp("plain")))  # type: ignore[arg-type]
    await draft.start()
    await plain.start()
    yield draft, plain
    await draft.shutdown()
    await plain.shutdown()


def _request(engine: AsyncEngine, text: str, **params: object) -> GenerationRequest:
    prompt = engine.render_chat([{"role": "user", "content": text}])
    return GenerationRequest(
        request_id=f"d{next(_ids)}", prompt=prompt, add_special_tokens=False, params=SamplingParams(**params)
    )  # type: ignore[arg-type]


def _tokens(deltas: list[StreamDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


async def test_greedy_with_a_draft_model_equals_plain_alone_and_batched(
    engines: tuple[AsyncEngine, AsyncEngine],
) -> None:
    draft, plain = engines
    params = {"temperature": 0.0, "max_tokens": 40}
    refs = [await generate(plain, _request(plain, p, **params)) for p in PROMPTS]
    for (_, ref), prompt in zip(refs, PROMPTS, strict=True):
        _, got = await generate(draft, _request(draft, prompt, **params))
        assert _tokens(got) == _tokens(ref)
    batched = await asyncio.gather(*(generate(draft, _request(draft, p, **params)) for p in PROMPTS))
    accepted = 0
    for (_, ref), (_, got) in zip(refs, batched, strict=True):
        assert _tokens(got) == _tokens(ref)
        usage = got[-1].usage
        assert usage is not None
        accepted += usage.accepted_tokens
    assert accepted > 0  # the model drafting for itself is nearly always right
    counts = {g: (d, a) for g, d, a in draft.stats().speculative}
    assert counts["draft"][1] > 0


async def test_seeded_sampling_with_a_draft_model_is_reproducible(
    engines: tuple[AsyncEngine, AsyncEngine],
) -> None:
    draft, plain = engines
    params = {"temperature": 0.8, "seed": 11, "max_tokens": 32, "logprobs": True, "top_logprobs": TOP_K}
    text1, first = await generate(draft, _request(draft, PROMPTS[0], **params))
    text2, _ = await generate(draft, _request(draft, PROMPTS[0], **params))
    assert text1 == text2
    _, ref = await generate(plain, _request(plain, PROMPTS[0], **params))
    assert_same_sample_or_boundary_flip(ref, first)
