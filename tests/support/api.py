"""The app in process: an httpx client on it over ASGI, with the app's lifespan running."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI


@asynccontextmanager
async def asgi_client(
    app: FastAPI, *, raise_app_exceptions: bool = True, timeout: float = 60.0
) -> AsyncIterator[httpx.AsyncClient]:
    """A client on `app` at http://test. `raise_app_exceptions=False` answers an exception a route
    raises with the app's 500, as a server would, instead of raising it in the test."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=timeout) as client:
            yield client


async def model_id(client: httpx.AsyncClient) -> str:
    """The id of the one model the app serves."""
    return str((await client.get("/v1/models")).json()["data"][0]["id"])
