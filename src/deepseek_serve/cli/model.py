"""`deepseek-serve model pull|list|info`: fetch and inspect weights."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from deepseek_serve.cli._common import fail, settings_from_cli

model_app = typer.Typer(help="Download and inspect models.", no_args_is_help=True)
console = Console()


@model_app.command("pull")
def pull(
    model: Annotated[
        str | None,
        typer.Argument(
            help="pack name (see `model list`) or hub id (org/name or org/name:file.gguf); default DS_MODEL"
        ),
    ] = None,
    source: Annotated[str | None, typer.Option(help="huggingface | modelscope")] = None,
) -> None:
    """Download a model into the cache (progress bar; packs are verified by sha256); prints the local path."""
    from deepseek_serve.models.resolve import ModelResolutionError, resolve_model

    settings = settings_from_cli(model=model, model_source=source)
    try:
        resolved = resolve_model(
            settings.model,
            cache_dir=settings.models_dir,
            source=settings.model_source,
            revision=settings.model_revision,
            index_url=settings.pack_index_url,
        )
    except ModelResolutionError as exc:
        fail(str(exc))
    console.print(f"{resolved.model_id}: {resolved.path} ({resolved.format}, {resolved.source})")


@model_app.command("list")
def list_models() -> None:
    """The model packs (and whether each is on disk), then what else the cache folder holds."""
    from deepseek_serve.models.packs import DEFAULT_PACK, PACKS, cached_pack, installed_pack

    settings = settings_from_cli()
    root = settings.models_dir
    packs = Table("pack", "model", "size", "status", "path", title="model packs (DS_MODEL=<pack>)")
    for pack in PACKS.values():
        name = f"{pack.name} (default)" if pack.name == DEFAULT_PACK else pack.name
        cached, installed = cached_pack(pack, root), installed_pack(pack)
        status = "pulled" if cached else "installed" if installed else "not pulled"
        path = cached or installed
        packs.add_row(name, pack.model_id, _size(pack.size), status, str(path) if path else "")
    console.print(packs)
    table = Table("model", "format", "size", "path", title=f"downloaded from a hub ({root})")
    if root.is_dir():
        for repo in sorted(root.glob("models--*")):
            name = repo.name.removeprefix("models--").replace("--", "/")
            files = [p for p in repo.rglob("*") if p.is_file()]
            fmt = "gguf" if any(p.suffix == ".gguf" for p in files) else "hf"
            table.add_row(name, fmt, _size(sum(p.stat().st_size for p in files)), str(repo))
    if table.row_count:
        console.print(table)


@model_app.command("info")
def info(
    model: Annotated[str | None, typer.Argument(help="model (default DS_MODEL)")] = None,
) -> None:
    """Resolve a model (no download) and print what the engine would serve."""
    from deepseek_serve.engine.sampling_defaults import from_generation_config, from_gguf_metadata
    from deepseek_serve.models.packs import DEFAULT_PACK
    from deepseek_serve.models.resolve import ModelResolutionError, resolve_model

    settings = settings_from_cli(model=model)
    try:
        resolved = resolve_model(
            settings.model,
            cache_dir=settings.models_dir,
            source=settings.model_source,
            revision=settings.model_revision,
            download=False,
        )
    except ModelResolutionError as exc:
        fail(f"{exc}\n{_SWITCH}" if not settings.model else str(exc))
    table = Table("field", "value", show_header=False)
    table.add_row("id", resolved.model_id)
    table.add_row("path", str(resolved.path))
    table.add_row("format", resolved.format)
    table.add_row("source", resolved.source)
    if resolved.format == "gguf":
        from deepseek_serve.engine.runners.llamacpp import LlamaCppRunner

        small = settings.model_copy(update={"context_length": 512, "max_batch_size": 1, "max_model_len": 0})
        runner = LlamaCppRunner.from_settings(small, resolved.path)
        for key in ("general.architecture", "general.name", "general.file_type"):
            table.add_row(key, str(runner.metadata(key)))
        table.add_row("trained context", str(runner.n_ctx_train))
        table.add_row("vocab", str(runner.tokenizer.vocab_size))
        table.add_row("chat template", "yes" if runner.chat_template else "no")
        sampling = from_gguf_metadata(runner.metadata)
        runner.close()
    else:
        import json

        cfg = json.loads((resolved.path / "config.json").read_text())
        for key in (
            "architectures",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "max_position_embeddings",
        ):
            table.add_row(key, str(cfg.get(key)))
        sampling = from_generation_config(resolved.path)
    table.add_row(
        "default sampling",
        f"temperature {sampling.temperature:g}, top_p {sampling.top_p:g}, "
        f"top_k {sampling.top_k or 'off'}, min_p {sampling.min_p:g}, repetition penalty "
        f"{sampling.repetition_penalty:g} (from {sampling.source}; a request's own values win)",
    )
    console.print(table)
    if not settings.model:
        console.print(f"This is the default model (the {DEFAULT_PACK} pack: DS_MODEL is empty).\n{_SWITCH}")


_SWITCH = (
    "To serve a DeepSeek model instead, set DS_MODEL (or pass --model / -m), e.g.\n"
    "  DS_MODEL=bartowski/DeepSeek-R1-Distill-Qwen-1.5B-GGUF   (GGUF from Hugging Face, CPU)\n"
    "  DS_MODEL=deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B      (checkpoint, PyTorch runner, GPU)\n"
    "  DS_MODEL=/path/to/deepseek-coder-1.3b-instruct.Q4_K_M.gguf\n"
    "Offline beyond PyPI: DS_MODEL=qwen2.5-coder-1.5b-instruct (the R1-Distill-Qwen-1.5B shape)."
)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
