"""Load a model from settings: resolve it, build its runner and the scheduler core over it, read its
chat template and describe it. `AsyncEngine.from_settings` wraps the result."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from deepseek_serve.engine.chat_template import ChatTemplate
from deepseek_serve.engine.llm_engine import EngineConfig, LLMEngine
from deepseek_serve.engine.runners import Runner, build_runner
from deepseek_serve.engine.sampling_defaults import FALLBACK, from_generation_config, from_gguf_metadata
from deepseek_serve.engine.types import ModelInfo, SamplingDefaults
from deepseek_serve.models.resolve import ResolvedModel, resolve_model

if TYPE_CHECKING:
    from deepseek_serve.config import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model, ready to serve: the scheduler core over its runner, its description, its chat
    template, and the system prompt its pack adds to conversations that have none."""

    core: LLMEngine
    info: ModelInfo
    template: ChatTemplate | None
    default_system_prompt: str | None


def load_template(settings: Settings, runner: Runner) -> ChatTemplate | None:
    source = Path(settings.chat_template).read_text() if settings.chat_template else runner.chat_template
    if not source:
        return None
    tok = runner.tokenizer
    return ChatTemplate(source, bos_token=tok.bos_token, eos_token=tok.eos_token)


def read_sampling_defaults(model: ResolvedModel, runner: Runner) -> SamplingDefaults:
    if model.format == "hf":
        return from_generation_config(model.path)
    metadata = getattr(runner, "metadata", None)
    return from_gguf_metadata(metadata) if callable(metadata) else FALLBACK


def load_model(settings: Settings) -> LoadedModel:
    """Resolve the model (downloading it if needed) and load it with the configured runner."""
    started = time.monotonic()
    model = resolve_model(
        settings.model,
        cache_dir=settings.models_dir,
        source=settings.model_source,
        revision=settings.model_revision,
        served_name=settings.served_model_name,
        index_url=settings.pack_index_url,
    )
    runner = build_runner(settings, model)
    template = load_template(settings, runner)
    core = LLMEngine(
        runner,
        EngineConfig(
            max_batch_size=settings.max_batch_size,
            max_queue_size=settings.max_queue_size,
            prefill_chunk_tokens=settings.prefill_chunk_tokens,
            long_prefill_tokens=settings.long_prefill_tokens,
            default_max_tokens=settings.default_max_tokens,
            request_timeout_s=settings.request_timeout_s,
            burst_wait_s=settings.burst_wait_ms / 1000.0,
            overlap=settings.overlap_schedule,
        ),
    )
    tok = runner.tokenizer
    info = ModelInfo(
        id=model.model_id,
        path=str(model.path),
        runner=runner.name,
        max_model_len=runner.max_model_len,
        vocab_size=tok.vocab_size,
        chat_template=template.source if template else None,
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
        eos_token_ids=tok.eos_token_ids,
        is_reasoning=bool(template and template.is_reasoning),
        template_prefills_think=bool(template and template.prefills_think),
        created=int(time.time()),
        sampling=read_sampling_defaults(model, runner),
    )
    logger.info(
        "model %s loaded from %s with the %s runner in %.1fs",
        info.id,
        info.path,
        info.runner,
        time.monotonic() - started,
    )
    return LoadedModel(core, info, template, model.default_system_prompt)
