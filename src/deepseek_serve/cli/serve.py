"""`deepseek-serve serve`: the OpenAI-compatible API under Uvicorn (uvloop + httptools).

Each worker process builds its own app (and engine) through the factory
`deepseek_serve.api.app:create_app_from_env`, which reads `DS_*`; flags are passed on to the
workers as `DS_*` environment variables. Connections go through `api/http_protocol.py` (deadlines
for idle connections, request headers and bodies; a header size limit). SIGTERM: Uvicorn stops
accepting, in-flight requests finish for up to `DS_DRAIN_TIMEOUT_S`, the lifespan drains the engine,
and the process exits 0.
"""

from __future__ import annotations

import math
import os
import signal
from typing import Annotated, Any, cast

import typer

from deepseek_serve.cli._common import pull_pack_first, settings_from_cli

APP_FACTORY = "deepseek_serve.api.app:create_app_from_env"


def serve(
    host: Annotated[str | None, typer.Option("--host", help="bind address (DS_HOST)")] = None,
    port: Annotated[int | None, typer.Option("--port", "-p", help="TCP port (DS_PORT)")] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", "-w", help="worker processes, each loads the model (DS_WORKERS)")
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
    import uvicorn

    from deepseek_serve.api.http_protocol import protocol_factory
    from deepseek_serve.observability.logs import uvicorn_log_config

    overrides = {"host": host, "port": port, "workers": workers, "model": model, "log_level": log_level, "role": role}
    settings = settings_from_cli(**overrides)
    pull_pack_first(settings)
    # workers re-read the environment, so flags travel as DS_* variables.
    for name, value in overrides.items():
        if value is not None:
            os.environ[f"DS_{name.upper()}"] = str(value)
    # Uvicorn re-raises SIGTERM after its graceful shutdown; a no-op handler makes that a clean exit 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    if settings.workers > 1:
        from deepseek_serve.observability.metrics import prepare_multiprocess_dir

        # before the workers spawn: they inherit PROMETHEUS_MULTIPROC_DIR and share /metrics files.
        prepare_multiprocess_dir(settings.data_dir)
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
