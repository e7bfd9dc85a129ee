"""`deepseek-serve serve`: the OpenAI-compatible API under Uvicorn (uvloop + httptools).

Each worker process builds its own app through the factory
`deepseek_serve.api.app:create_app_from_env`, which reads `DS_*`; flags are passed on to the
workers as `DS_*` environment variables. With several workers and the engine in its own process
(`DS_ENGINE_PROCESS`), this process starts one engine process (`EngineHost`) and every worker connects
to it: one model in memory, the API work spread over the workers. Otherwise each worker loads its own.
Connections go through `api/http_protocol.py` (deadlines for idle connections, request headers and
bodies; a header size limit). SIGTERM: Uvicorn stops accepting, in-flight requests finish for up to
`DS_DRAIN_TIMEOUT_S`, the lifespan drains the engine, and the process exits 0.
"""

from __future__ import annotations

import logging.config
import math
import os
import signal
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

from deepseek_serve.cli._common import pull_pack_first, settings_from_cli

if TYPE_CHECKING:
    from deepseek_serve.config import Settings
    from deepseek_serve.engine.process import EngineHost

APP_FACTORY = "deepseek_serve.api.app:create_app_from_env"
AUTO_WORKERS = 4  # API workers over a shared engine process when DS_WORKERS is not set


def serve(
    host: Annotated[str | None, typer.Option("--host", help="bind address (DS_HOST)")] = None,
    port: Annotated[int | None, typer.Option("--port", "-p", help="TCP port (DS_PORT)")] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            "-w",
            help="API worker processes (DS_WORKERS); they share one engine process when DS_ENGINE_PROCESS "
            "is on, else each loads the model",
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="GGUF file, HF folder or hub id (DS_MODEL)")
    ] = None,
    log_level: Annotated[
        str | None, typer.Option("--log-level", help="debug|info|warning|error (DS_LOG_LEVEL)")
    ] = None,
    role: Annotated[
        str | None,
        typer.Option(
            "--role",
            help="all (API + engine) | engine (internal API, load report) | gateway (API over DS_UPSTREAMS) (DS_ROLE)",
        ),
    ] = None,
) -> None:
    """Serve the OpenAI-compatible HTTP API (or one role of a scaled-out deployment: --role)."""
    from deepseek_serve.observability.logs import uvicorn_log_config

    overrides = {"host": host, "port": port, "workers": workers, "model": model, "log_level": log_level, "role": role}
    settings = settings_from_cli(**overrides)
    pull_pack_first(settings)
    # workers re-read the environment, so flags travel as DS_* variables.
    for name, value in overrides.items():
        if value is not None:
            os.environ[f"DS_{name.upper()}"] = str(value)
    settings = _shared_engine_workers(settings)
    # Uvicorn re-raises SIGTERM after its graceful shutdown; a no-op handler makes that a clean exit 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    engine_host: EngineHost | None = None
    if settings.workers > 1:
        from deepseek_serve.engine.process import EngineHost, use_engine_process
        from deepseek_serve.observability.metrics import prepare_multiprocess_dir

        # before the workers spawn: they inherit PROMETHEUS_MULTIPROC_DIR and share /metrics files.
        prepare_multiprocess_dir(settings.data_dir)
        if settings.role in ("all", "engine") and use_engine_process(settings):
            logging.config.dictConfig(uvicorn_log_config(settings))  # as Uvicorn will: the host logs too
            try:
                engine_host = EngineHost.start(settings, log_config=uvicorn_log_config(settings))
            except RuntimeError as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(1) from None
            os.environ.update(engine_host.environ())  # the workers connect to it
            # the engine gone: stop serving (Uvicorn's supervisor drains the workers on SIGTERM)
            engine_host.watch(lambda: os.kill(os.getpid(), signal.SIGTERM))
    try:
        _run_uvicorn(settings)
    finally:
        if engine_host is not None:
            engine_host.stop()
    if engine_host is not None and engine_host.died:
        raise typer.Exit(1)


def _shared_engine_workers(settings: Settings) -> Settings:
    """With the engine in its own process and no worker count given (flag or DS_WORKERS), serve with
    min(4, usable CPUs: the affinity mask capped by a container's CPU limit) API workers over it: one
    API process frames about 5,000 SSE events/s, a fraction of what a GPU engine produces at 64
    streams (docs/performance.md)."""
    if "workers" in settings.model_fields_set or settings.role == "gateway":
        return settings
    from deepseek_serve.config import usable_cpus
    from deepseek_serve.engine.process import use_engine_process

    if not use_engine_process(settings):
        return settings
    workers = min(AUTO_WORKERS, usable_cpus())
    # the workers read both (an engine role accepts several workers only with the engine process on)
    os.environ["DS_WORKERS"] = str(workers)
    os.environ["DS_ENGINE_PROCESS"] = "on"
    return settings.model_copy(update={"workers": workers, "engine_process": "on"})


def _run_uvicorn(settings: Settings) -> None:
    import uvicorn

    from deepseek_serve.api.http_protocol import protocol_factory
    from deepseek_serve.observability.logs import uvicorn_log_config

    uvicorn.run(
        APP_FACTORY,
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        # httptools with header/body deadlines and a header size limit (api/http_protocol.py)
        http=cast(Any, protocol_factory(settings)),
        log_config=uvicorn_log_config(settings),
        log_level=settings.log_level,
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s),
        timeout_keep_alive=math.ceil(settings.http_keepalive_timeout_s),
        server_header=False,
        proxy_headers=True,
    )


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
