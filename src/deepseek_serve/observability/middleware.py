"""`HTTPMetricsMiddleware`: pure ASGI (streams pass through untouched).

Per HTTP request: counts it in progress, opens the log field scope (`request_log_scope`), and when
the response starts binds route, status and latency for Uvicorn's access line; at the end records
`ds_http_requests_total{method,route,status}` and `ds_http_request_duration_seconds{method,route}`.

`route` is the matched route's template (`/v1/models/{model_id}`), `<unmatched>` when no route
matched, so a client cannot grow the label set with made-up paths.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepseek_serve.observability.logs import request_log_scope

UNMATCHED_ROUTE = "<unmatched>"
CLIENT_CLOSED = 499  # nginx's code for a client that left before the response started


class HTTPMetricsSink(Protocol):
    def observe_http(self, method: str, route: str, status: int, duration_s: float) -> None: ...

    def http_started(self) -> Any: ...


def route_template(scope: Scope) -> str:
    """The matched route's path template (FastAPI/Starlette put the route on the scope)."""
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED_ROUTE


def _metrics_from_app(scope: Scope) -> HTTPMetricsSink | None:
    app = scope.get("app")
    services = getattr(getattr(app, "state", None), "services", None)
    metrics = getattr(services, "metrics", None)
    return metrics if hasattr(metrics, "observe_http") else None


class HTTPMetricsMiddleware:
    """`metrics`: a fixed sink; None = `app.state.services.metrics` looked up per request (it exists
    only once the lifespan has built the services)."""

    def __init__(self, app: ASGIApp, metrics: HTTPMetricsSink | None = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.metrics or _metrics_from_app(scope)
        method: str = scope.get("method", "GET")
        start = time.perf_counter()
        status: int | None = None
        done = metrics.http_started() if metrics is not None else None

        with request_log_scope() as fields:

            async def send_and_watch(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                    state = scope.get("state") or {}
                    fields.update(
                        route=route_template(scope),
                        status=status,
                        latency_ms=round((time.perf_counter() - start) * 1000.0, 2),
                    )
                    if "request_id" not in fields and state.get("request_id"):
                        fields["request_id"] = state["request_id"]
                await send(message)

            try:
                await self.app(scope, receive, send_and_watch)
            except asyncio.CancelledError:
                if status is None:
                    status = CLIENT_CLOSED
                raise
            except BaseException:
                if status is None:
                    status = 500
                raise
            finally:
                if done is not None:
                    done()
                if metrics is not None:
                    metrics.observe_http(method, route_template(scope), status or 500, time.perf_counter() - start)
