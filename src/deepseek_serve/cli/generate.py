"""`deepseek-serve generate` and `deepseek-serve chat`: the engine in a terminal, streaming."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any

import typer

from deepseek_serve.cli._common import err_console, fail, pull_pack_first, run_loop, settings_from_cli

if TYPE_CHECKING:
    from deepseek_serve.engine.async_engine import AsyncEngine

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="GGUF file, HF folder or hub id (DS_MODEL)")]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="completion budget")]
TempOpt = Annotated[
    float | None,
    typer.Option("--temperature", "-t", min=0.0, max=2.0, help="0 = greedy; default: the model's recommended sampling"),
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="fixed seed: same output every run")]
SystemOpt = Annotated[str | None, typer.Option("--system", help="system prompt")]


def _load(model: str | None) -> AsyncEngine:
    from deepseek_serve.engine.async_engine import AsyncEngine
    from deepseek_serve.models.resolve import ModelResolutionError

    settings = settings_from_cli(model=model, max_batch_size=1, max_queue_size=1)
    pull_pack_first(settings)
    try:
        with err_console.status(f"loading {settings.model or 'the default model'}..."):
            return AsyncEngine.from_settings(settings)
    except (ModelResolutionError, ValueError, RuntimeError) as exc:
        fail(str(exc))


@contextlib.contextmanager
def _typing_hidden() -> Iterator[None]:
    """While a reply streams, keys typed at a terminal are not echoed into it; what was typed
    meanwhile is discarded, so the next prompt starts empty."""
    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else -1
    if fd < 0:
        yield
        return
    import termios

    before = termios.tcgetattr(fd)
    quiet = list(before)
    quiet[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, before)


async def _stream(
    engine: AsyncEngine,
    messages: list[dict[str, Any]] | None,
    prompt: str | None,
    max_tokens: int,
    temperature: float | None,
    seed: int | None,
) -> str:
    """Generate and print as tokens arrive; returns the full text. Fields not given take the model's
    recommended sampling (`ModelInfo.sampling`)."""
    from deepseek_serve.engine.types import GenerationRequest, SamplingParams

    if messages is not None:
        text, special = engine.render_chat(messages), False
    else:
        assert prompt is not None
        text, special = prompt, True
    request = GenerationRequest(
        request_id=f"cli-{uuid.uuid4().hex[:8]}",
        prompt=text,
        params=SamplingParams(
            max_tokens=max_tokens, seed=seed, **engine.model_info.sampling.fill(temperature=temperature)
        ),
        add_special_tokens=special,
    )
    parts: list[str] = []
    with _typing_hidden():
        async for delta in engine.generate(request):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
            parts.append(delta.text)
            if delta.finished and delta.error:
                err_console.print(f"\n[red]{delta.error}[/]")
    sys.stdout.write("\n")
    return "".join(parts)


def generate(
    prompt: Annotated[str, typer.Argument(help="the user message (or raw text with --raw)")],
    model: ModelOpt = None,
    max_tokens: MaxTokensOpt = 256,
    temperature: TempOpt = None,
    seed: SeedOpt = None,
    system: SystemOpt = None,
    raw: Annotated[bool, typer.Option("--raw", help="complete the text as is, no chat template")] = False,
) -> None:
    """Answer one message, streaming the reply to stdout."""
    from deepseek_serve.engine.errors import EngineError

    engine = _load(model)

    async def run() -> None:
        await engine.start()
        try:
            messages = None
            if not raw:
                messages = ([{"role": "system", "content": system}] if system else []) + [
                    {"role": "user", "content": prompt}
                ]
            await _stream(engine, messages, prompt if raw else None, max_tokens, temperature, seed)
        finally:
            await engine.shutdown()

    try:
        run_loop(run())
    except EngineError as exc:
        fail(str(exc))


def chat(
    model: ModelOpt = None,
    max_tokens: MaxTokensOpt = 512,
    temperature: TempOpt = None,
    seed: SeedOpt = None,
    system: SystemOpt = None,
) -> None:
    """Interactive chat that keeps the conversation. /reset starts over, /exit (or Ctrl-D) quits."""
    from deepseek_serve.engine.errors import EngineError

    engine = _load(model)
    err_console.print(f"[bold]{engine.model_info.id}[/] ready. /reset starts over, /exit quits.")

    async def run() -> None:
        await engine.start()
        history: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        try:
            while True:
                try:
                    line = await asyncio.to_thread(input, "\n> ")
                except EOFError:
                    break
                line = line.strip()
                if not line:
                    continue
                if line in ("/exit", "/quit"):
                    break
                if line == "/reset":
                    history = history[:1] if system else []
                    err_console.print("[dim]conversation cleared[/]")
                    continue
                history.append({"role": "user", "content": line})
                try:
                    answer = await _stream(engine, history, None, max_tokens, temperature, seed)
                except EngineError as exc:
                    history.pop()
                    err_console.print(f"[red]{exc}[/]")
                    continue
                history.append({"role": "assistant", "content": answer})
        finally:
            await engine.shutdown()

    try:
        run_loop(run())
    except KeyboardInterrupt:
        pass


def register(app: typer.Typer) -> None:
    app.command()(generate)
    app.command()(chat)
