"""`GET /metrics`: Prometheus text exposition of `services.metrics`.

Open unless `DS_METRICS_TOKEN` is set; then it wants `Authorization: Bearer <token>` (401 otherwise).
Not behind API keys, so Prometheus needs no `sk-` key.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import Response

from deepseek_serve.api.deps import ServicesDep
from deepseek_serve.observability.metrics import PrometheusMetrics
from deepseek_serve.serving.failures import ApiError, AuthError

router = APIRouter(tags=["monitoring"])


def _token_matches(authorization: str | None, token: str) -> bool:
    scheme, _, presented = (authorization or "").partition(" ")
    # constant-time compare; both sides encoded so non-ASCII input cannot raise.
    return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode())


@router.get("/metrics", include_in_schema=False)
async def metrics(services: ServicesDep, authorization: Annotated[str | None, Header()] = None) -> Response:
    """Every metric in Prometheus' text format. 401 without the metrics token when one is set;
    404 when metrics are off."""
    token = services.settings.metrics_token
    if token and not _token_matches(authorization, token):
        raise AuthError(
            "A valid metrics token is required: send 'Authorization: Bearer <DS_METRICS_TOKEN>'.",
            code="invalid_metrics_token",
        )
    if not isinstance(services.metrics, PrometheusMetrics):
        raise ApiError(
            404, "Metrics are not enabled on this server.", "invalid_request_error", None, "metrics_disabled"
        )
    body, content_type = services.metrics.render()
    return Response(body, media_type=content_type, headers={"Cache-Control": "no-store"})
