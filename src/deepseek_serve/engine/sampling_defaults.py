"""A model's recommended sampling: what a request that leaves temperature, top_p... open gets.

Read from the checkpoint's `generation_config.json`, else from a GGUF's `general.sampling.*` metadata;
a source that names any sampling value is taken as a whole (values it leaves out are neutral:
temperature 1, top_p 1, top_k/min_p off, no repetition penalty). A model without one gets
`FALLBACK`: temperature 0.7, top_p 0.8, repetition penalty 1.05 (Qwen2.5's instruct settings, which
keep small models from looping). Greedy decoding happens only when a request asks for temperature 0.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

from deepseek_serve.engine.types import SamplingDefaults

logger = logging.getLogger(__name__)

FALLBACK = SamplingDefaults(temperature=0.7, top_p=0.8, top_k=0, min_p=0.0, repetition_penalty=1.05, source="fallback")

# field -> (generation_config.json key, GGUF metadata key, allowed range)
_FIELDS: dict[str, tuple[str, str, float, float]] = {
    "temperature": ("temperature", "general.sampling.temp", 0.0, 2.0),
    "top_p": ("top_p", "general.sampling.top_p", 1e-6, 1.0),
    "top_k": ("top_k", "general.sampling.top_k", 0, 1_000_000),
    "min_p": ("min_p", "general.sampling.min_p", 0.0, 1.0),
    "repetition_penalty": ("repetition_penalty", "general.sampling.penalty_repeat", 1e-6, 10.0),
}
_NEUTRAL = SamplingDefaults(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0)


def _build(values: dict[str, float], source: str) -> SamplingDefaults:
    if not values:
        return FALLBACK
    return SamplingDefaults(
        temperature=values.get("temperature", _NEUTRAL.temperature),
        top_p=values.get("top_p", _NEUTRAL.top_p),
        top_k=int(values.get("top_k", _NEUTRAL.top_k)),
        min_p=values.get("min_p", _NEUTRAL.min_p),
        repetition_penalty=values.get("repetition_penalty", _NEUTRAL.repetition_penalty),
        source=source,
    )


def _number(raw: object, lo: float, hi: float) -> float | None:
    """A finite number within [lo, hi]; anything else (missing, text, out of range) is ignored."""
    if isinstance(raw, bool) or raw is None:
        return None
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and lo <= value <= hi else None


def from_generation_config(folder: Path) -> SamplingDefaults:
    """From a Hugging Face folder's generation_config.json (FALLBACK when absent or silent)."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return FALLBACK
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("ignoring %s: %s", path, exc)
        return FALLBACK
    if not isinstance(config, dict):
        return FALLBACK
    values: dict[str, float] = {}
    for name, (key, _, lo, hi) in _FIELDS.items():
        value = _number(config.get(key), lo, hi)
        if value is not None:
            values[name] = value
    # transformers reads top_k 50 when the file omits it; a recommendation without top_k keeps it off
    return _build(values, "generation_config.json")


def from_gguf_metadata(get: Callable[[str], str | None]) -> SamplingDefaults:
    """From GGUF `general.sampling.*` keys, read through `get(key)` (FALLBACK when none is set)."""
    values: dict[str, float] = {}
    for name, (_, key, lo, hi) in _FIELDS.items():
        value = _number(get(key), lo, hi)
        if value is not None:
            values[name] = value
    return _build(values, "gguf metadata")
