"""Throwaway database and cache servers for a test session.

Tests that need MariaDB or Redis use the shared server when it answers (tests.support.storage.mariadb,
tests.support.cache.redis_url). When it does not, they start a throwaway one on a free loopback
port, once per session, if its binary is installed; otherwise the tests skip with one line saying
how to enable them. DS_TEST_THROWAWAY_SERVERS=off never starts one (as if nothing were installed).
"""

from __future__ import annotations

import atexit
import os
import shutil
from collections.abc import Callable
from typing import NoReturn

import pytest

_cleanups: list[Callable[[], None]] = []
_skip_reasons: set[str] = set()


def skip(reason: str) -> NoReturn:
    """Skips the test; every test skipped for the same `reason` is reported on one summary line
    (tests/conftest.py points their reports at this function)."""
    _skip_reasons.add(reason)
    pytest.skip(reason)


def folded_skip(message: str) -> tuple[str, int, str] | None:
    """The common report location for a skip `message` raised by `skip`, else None."""
    reason = message.removeprefix("Skipped: ")
    if reason not in _skip_reasons:
        return None
    return (__file__, skip.__code__.co_firstlineno, message)


def installed(binary: str) -> str | None:
    """Path of `binary` on PATH or in /usr/sbin (where Debian puts mariadbd), None when absent or
    when DS_TEST_THROWAWAY_SERVERS=off."""
    if os.environ.get("DS_TEST_THROWAWAY_SERVERS", "").lower() in ("off", "0", "false", "no"):
        return None
    return shutil.which(binary, path=os.pathsep.join((os.environ.get("PATH", ""), "/usr/sbin")))


def require(binary: str, package: str) -> str:
    """Path of `binary`; skips the test (saying which package) when it is not installed."""
    path = installed(binary)
    if path is None:
        skip(f"{binary} not installed: apt-get install {package}")
    return path


def on_session_end(cleanup: Callable[[], None]) -> None:
    """Runs `cleanup` when the test session ends (tests/conftest.py), or at exit outside pytest."""
    _cleanups.append(cleanup)


def stop_throwaway_servers() -> None:
    while _cleanups:
        cleanup = _cleanups.pop()
        try:
            cleanup()
        except Exception as exc:  # one failed clean-up must not keep the others from running
            print(f"tests.support.services: clean-up failed: {exc!r}")


atexit.register(stop_throwaway_servers)
