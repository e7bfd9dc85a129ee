"""The torch runner behind the real engine (loader, scheduler, detokenizer, AsyncEngine) on the real
SmolLM2 weights dequantized into a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepseek_serve.engine.async_engine import AsyncEngine
from deepseek_serve.engine.types import GenerationRequest, SamplingParams
from tests.support.settings import make_settings
from tests.support.torch_models import smollm2_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
async def test_engine_serves_a_hf_folder_with_the_torch_runner(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    folder = smollm2_checkpoint(request.config)
    settings = make_settings(
        tmp_path,
        model=str(folder),
        runner="auto",
        device="cpu",
        max_batch_size=2,
        max_model_len=512,
        context_length=1024,
    )
    engine = AsyncEngine.from_settings(settings)
    assert engine.model_info.runner == "torch" and engine.model_info.eos_token_ids == (2,)
    await engine.start()
    try:
        prompt = engine.render_chat([{"role": "user", "content": "What is the capital of France?"}])
        params = SamplingParams(max_tokens=12, temperature=0.0)
        text, last = await engine.complete(
            GenerationRequest("t1", prompt=prompt, params=params, add_special_tokens=False)
        )
        assert "Paris" in text and last.usage is not None
        assert last.finish_reason in ("stop", "length") and 0 < last.usage.completion_tokens <= 12
        # the same conversation again: its prompt comes from the prefix cache, the output is identical
        text2, last2 = await engine.complete(
            GenerationRequest("t2", prompt=prompt, params=params, add_special_tokens=False)
        )
        assert text2 == text
        assert last2.usage is not None and last2.usage.cached_tokens == last2.usage.prompt_tokens - 1
    finally:
        await engine.shutdown()
