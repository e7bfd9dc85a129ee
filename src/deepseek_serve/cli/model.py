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
    model: Annotated[str | None, typer.Argument(help="hub id (org/name or org/name:file.gguf); default DS_MODEL")]
    = None,
    source: Annotated[str | None, typer.Option(help="huggingface | modelscope")] = None,
) -> None:
    """Download a model into the cache (progress bar); prints the local path."""
    from deepseek_serve.models.resolve import ModelResolutionError, resolve_model

    settings = settings_from_cli(model=model, model_source=source)
    try:
        resolved = resolve_model(settings.model, cache_dir=settings.models_dir, source=settings.model_source,
                                 revision=settings.model_revision)
    except ModelResolutionError as exc:
        fail(str(exc))
    console.print(f"{resolved.model_id}: {resolved.path} ({resolved.format}, {resolved.source})")


@model_app.command("list")
def list_models() -> None:
    """Models in the cache folder, and the built-in default."""
    from deepseek_serve.models.resolve import DEFAULT_MODEL_ID, ModelResolutionError, default_model_path

    settings = settings_from_cli()
    table = Table("model", "format", "size", "path")
    try:
        path = default_model_path()
        table.add_row(f"{DEFAULT_MODEL_ID} (default)", "gguf", _size(path.stat().st_size), str(path))
    except ModelResolutionError:
        pass
    root = settings.models_dir
    if root.is_dir():
        for repo in sorted(root.glob("models--*")):
            name = repo.name.removeprefix("models--").replace("--", "/")
            files = [p for p in repo.rglob("*") if p.is_file()]
            fmt = "gguf" if any(p.suffix == ".gguf" for p in files) else "hf"
            table.add_row(name, fmt, _size(sum(p.stat().st_size for p in files)), str(repo))
    console.print(table)


@model_app.command("info")
def info(
    model: Annotated[str | None, typer.Argument(help="model (default DS_MODEL)")] = None,
) -> None:
    """Resolve a model (no download) and print what the engine would serve."""
    from deepseek_serve.models.resolve import ModelResolutionError, resolve_model

    settings = settings_from_cli(model=model)
    try:
        resolved = resolve_model(settings.model, cache_dir=settings.models_dir, source=settings.model_source,
                                 revision=settings.model_revision, download=False)
    except ModelResolutionError as exc:
        fail(str(exc))
    table = Table("field", "value", show_header=False)
    table.add_row("id", resolved.model_id)
    table.add_row("path", str(resolved.path))
    table.add_row("format", resolved.format)
    table.add_row("source", resolved.source)
    if resolved.format == "gguf":
        from deepseek_serve.engine.llamacpp_runner import LlamaCppRunner

        runner = LlamaCppRunner(resolved.path, context_length=512, max_batch_size=1)
        for key in ("general.architecture", "general.name", "general.file_type"):
            table.add_row(key, str(runner.metadata(key)))
        table.add_row("trained context", str(runner.n_ctx_train))
        table.add_row("vocab", str(runner.tokenizer.vocab_size))
        table.add_row("chat template", "yes" if runner.chat_template else "no")
        runner.close()
    else:
        import json

        cfg = json.loads((resolved.path / "config.json").read_text())
        for key in ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size", "max_position_embeddings"):
            table.add_row(key, str(cfg.get(key)))
    console.print(table)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
