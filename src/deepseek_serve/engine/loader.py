"""Build an AsyncEngine from settings: resolve the model, pick the runner, read the chat template."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from deepseek_serve.engine.async_engine import AsyncEngine
from deepseek_serve.engine.chat_template import ChatTemplate
from deepseek_serve.engine.llm_engine import EngineConfig, LLMEngine
from deepseek_serve.engine.runner import Runner
from deepseek_serve.engine.sampling_defaults import FALLBACK, from_generation_config, from_gguf_metadata
from deepseek_serve.engine.types import ModelInfo, SamplingDefaults
from deepseek_serve.models.resolve import ResolvedModel, resolve_model

if TYPE_CHECKING:
    from deepseek_serve.config import Settings

logger = logging.getLogger(__name__)

RUNNERS = ("llamacpp", "torch")


def choose_runner(settings: Settings, model: ResolvedModel) -> str:
    if settings.runner != "auto":
        wanted = settings.runner
        if wanted == "llamacpp" and model.format != "gguf":
            raise ValueError(f"DS_RUNNER=llamacpp needs a GGUF file, but {model.path} is a Hugging Face folder")
        if wanted == "torch" and model.format != "hf":
            raise ValueError(f"DS_RUNNER=torch needs a Hugging Face folder, but {model.path} is a GGUF file")
        return wanted
    return "llamacpp" if model.format == "gguf" else "torch"


def build_runner(settings: Settings, model: ResolvedModel) -> Runner:
    name = choose_runner(settings, model)
    if name == "llamacpp":
        from deepseek_serve.engine.llamacpp_runner import LlamaCppRunner

        return LlamaCppRunner(
            model.path,
            context_length=settings.context_length,
            max_batch_size=settings.max_batch_size,
            max_model_len=settings.max_model_len,
            n_threads=settings.n_threads,
            prefill_chunk_tokens=settings.prefill_chunk_tokens,
            prefix_cache=settings.prefix_cache,
            prefix_cache_tokens=settings.prefix_cache_tokens,
            repack=settings.llama_repack,
        )
    try:
        from deepseek_serve.engine.torch_runner import TorchRunner
    except ImportError as exc:
        raise RuntimeError(f"the PyTorch runner needs `pip install 'deepseek-serve[torch]'` ({exc})") from exc
    return TorchRunner.from_settings(settings, model.path)


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


def load_engine(settings: Settings) -> AsyncEngine:
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
            default_max_tokens=settings.default_max_tokens,
            request_timeout_s=settings.request_timeout_s,
            burst_wait_s=settings.burst_wait_ms / 1000.0,
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
    return AsyncEngine(core, info, template, default_system_prompt=model.default_system_prompt)
