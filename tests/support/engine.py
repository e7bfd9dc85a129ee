"""Helpers for the engine tests."""

from __future__ import annotations

from deepseek_serve.engine.async_engine import AsyncEngine
from deepseek_serve.engine.types import GenerationRequest, StreamDelta


async def generate(engine: AsyncEngine, request: GenerationRequest) -> tuple[str, list[StreamDelta]]:
    """Runs `request` to the end: the whole text and every delta."""
    deltas = [d async for d in engine.generate(request)]
    return "".join(d.text for d in deltas), deltas


def is_valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
