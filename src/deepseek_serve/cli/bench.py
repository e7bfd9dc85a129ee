"""`deepseek-serve bench`: load-test an OpenAI-compatible server, or compare two results files."""

from __future__ import annotations

from pathlib import Path

import typer

CONSOLE_COLUMNS = (
    "phase",
    "requests",
    "errors",
    "errors by status",
    "req/s",
    "out tok/s",
    "TTFT p50",
    "TTFT p99",
    "TPOT mean",
    "E2E p99",
)


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected a comma-separated list of numbers, got {text!r}", param_hint=name) from None
    if any(v <= 0 for v in values):
        raise typer.BadParameter("values must be greater than 0", param_hint=name)
    return values


def bench(
    base_url: str = typer.Option(
        "http://127.0.0.1:8000/v1", "--base-url", help="server root, e.g. http://host:8000/v1 (a bare host gets /v1)"
    ),
    api_key: str = typer.Option("", "--api-key", envvar="OPENAI_API_KEY", help="sent as a Bearer token"),
    model: str = typer.Option("", "--model", help="model id; empty = the first of GET /v1/models"),
    workload: str = typer.Option(
        "short", "--workload", "-w", help="short | long-prompt | long-gen | multi-turn | repeat"
    ),
    endpoint: str = typer.Option("chat", "--endpoint", help="chat (/v1/chat/completions) | completions"),
    concurrency: str = typer.Option(
        "", "--concurrency", "-c", help="closed loop: comma-separated concurrencies, e.g. 1,2,4,8"
    ),
    rate: str = typer.Option(
        "", "--rate", "-r", help="open loop: comma-separated request rates (req/s), Poisson arrivals"
    ),
    num_requests: int | None = typer.Option(
        None, "--num-requests", "-n", min=1, help="requests per phase (default 32 unless --duration)"
    ),
    duration: float | None = typer.Option(None, "--duration", "-d", min=0.1, help="seconds per phase to keep sending"),
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", min=1, help="max_tokens of each request (default: per workload)"
    ),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, max=2.0),
    ignore_eos: bool = typer.Option(
        False, "--ignore-eos", help="ask for exactly max_tokens tokens (extension field `ignore_eos`)"
    ),
    stream_usage: bool = typer.Option(
        True, "--stream-usage/--no-stream-usage", help="request the usage chunk (stream_options.include_usage)"
    ),
    seed: int = typer.Option(0, "--seed", help="seeds the prompts and the Poisson arrivals"),
    timeout: float = typer.Option(600.0, "--timeout", min=0.1, help="seconds per request"),
    warmup: int = typer.Option(1, "--warmup", min=0, help="unmeasured requests sent first"),
    prompt_words: int = typer.Option(600, "--prompt-words", min=10, help="passage length of long-prompt"),
    label: str = typer.Option("", "--label", help="name of this run in reports (e.g. baseline)"),
    server_pid: int | None = typer.Option(None, "--server-pid", help="local server process: record its peak RSS"),
    output_dir: Path | None = typer.Option(
        None, "--output-dir", "-o", help="where results.json, report.md and plots go (default bench-results/<time>)"
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar"),
    compare: tuple[Path, Path] | None = typer.Option(
        None, "--compare", help="A.json B.json: print the differences (B/A) and exit"
    ),
    markdown: bool = typer.Option(False, "--markdown", help="with --compare: print a Markdown table"),
) -> None:
    """Load-test an OpenAI-compatible server: closed loop (--concurrency) and/or open loop (--rate)."""
    import asyncio
    import datetime as dt

    from rich.console import Console
    from rich.table import Table

    from deepseek_serve.bench import compare as cmp
    from deepseek_serve.bench import report

    console = Console()
    if compare:
        try:
            a, b = (report.load_json(p) for p in compare)
        except (OSError, ValueError) as exc:
            raise typer.BadParameter(str(exc), param_hint="--compare") from None
        name_a = a["meta"].get("label") or str(compare[0])
        name_b = b["meta"].get("label") or str(compare[1])
        rows = cmp.compare(a, b)
        if not rows:
            console.print("[red]the two files share no phase (match by label, e.g. c=8)[/red]")
            raise typer.Exit(1)
        if markdown:
            typer.echo(cmp.compare_markdown(rows, name_a, name_b))
            return
        table = Table(title=f"A = {name_a}   B = {name_b}")
        for header in cmp.COMPARE_HEADERS:
            table.add_column(header, justify="left" if header in ("phase", "metric") else "right")
        for row in cmp.format_rows(rows):
            table.add_row(*row)
        console.print(table)
        return

    from deepseek_serve.bench.benchmark import BenchConfig, BenchError, run_benchmark
    from deepseek_serve.bench.runner import Phase
    from deepseek_serve.bench.workloads import WORKLOADS

    if workload not in WORKLOADS:
        raise typer.BadParameter(f"choose one of: {', '.join(WORKLOADS)}", param_hint="--workload")
    if endpoint not in ("chat", "completions"):
        raise typer.BadParameter("choose chat or completions", param_hint="--endpoint")
    if num_requests is None and duration is None:
        num_requests = 32
    concurrencies = _floats(concurrency, "--concurrency") if concurrency else []
    rates = _floats(rate, "--rate") if rate else []
    if not concurrencies and not rates:
        concurrencies = [1.0]
    try:
        phases = tuple(
            [Phase("closed", c, num_requests, duration) for c in concurrencies]
            + [Phase("open", r, num_requests, duration) for r in rates]
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--concurrency") from None
    config = BenchConfig(
        base_url=base_url,
        phases=phases,
        workload=workload,
        api_key=api_key,
        model=model,
        endpoint=endpoint,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        temperature=temperature,
        ignore_eos=ignore_eos,
        stream_usage=stream_usage,
        timeout_s=timeout,
        seed=seed,
        warmup=warmup,
        prompt_words=prompt_words,
        label=label,
        server_pid=server_pid,
    )
    out = output_dir or Path("bench-results") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("errors {task.fields[errors]}"),
        TimeElapsedColumn(),
        console=console,
        disable=no_progress or not console.is_terminal,
    )
    state: dict[str, int] = {}

    def on_phase(phase: Phase) -> None:
        total = phase.num_requests if phase.num_requests is not None else None
        state["task"] = progress.add_task(phase.label, total=total, errors=0)
        state["errors"] = 0

    def on_result(result: object) -> None:
        state["errors"] += 0 if getattr(result, "ok", False) else 1
        progress.update(state["task"], advance=1, errors=state["errors"])  # type: ignore[arg-type]

    try:
        with progress:
            document = asyncio.run(run_benchmark(config, on_result=on_result, on_phase=on_phase))
    except BenchError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    paths = report.write_report(document, out)

    meta = document["meta"]
    table = Table(title=f"{label or workload} against {meta['base_url']} ({meta['model']})")
    # console: the headline columns; report.md has them all
    shown = [report.PHASE_HEADERS.index(h) for h in CONSOLE_COLUMNS]
    for i in shown:
        header = report.PHASE_HEADERS[i]
        table.add_column(header, justify="left" if header in ("phase", "errors by status") else "right")
    for row in report.phase_rows(document):
        table.add_row(*(row[i] for i in shown))
    console.print(table)
    console.print(f"latencies in ms; results in {paths['json']}, report in {paths['markdown']}")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
