"""Helpers for the cache tests: the Redis the tests use (`redis_url()`), a private redis-server on a
free port that a test may kill, key clean-up, an app server."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import redis

from tests.support.net import free_port, wait_for_port
from tests.support.server import ServeProcess
from tests.support.services import installed, on_session_end, require, skip

# The shared server the tests use when it answers.
SHARED_REDIS_URL = os.environ.get("DS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REDIS_PACKAGE = "redis-server"
_redis_url: str | None = None


def redis_answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


def redis_url() -> str:
    """The Redis for this session: the shared one (DS_TEST_REDIS_URL, redis://127.0.0.1:6379/0) when
    it answers, else a throwaway redis-server started once (stopped when the session ends); skips
    the test when neither is possible."""
    global _redis_url
    if _redis_url is not None:
        return _redis_url
    if redis_answers(SHARED_REDIS_URL):
        _redis_url = SHARED_REDIS_URL
        return _redis_url
    if installed("redis-server") is None:
        skip(
            f"Redis not running at {SHARED_REDIS_URL} and redis-server not installed: "
            f"apt-get install {REDIS_PACKAGE}, or set DS_TEST_REDIS_URL"
        )
    server = PrivateRedis()
    on_session_end(server.kill)
    server.start()
    _redis_url = server.url
    return _redis_url


def unique_prefix() -> str:
    """A key prefix of our own, so tests never touch other processes' keys on the shared Redis."""
    return f"test-cache-{uuid.uuid4().hex[:10]}:"


def delete_prefix(url: str, prefix: str) -> None:
    with contextlib.suppress(redis.RedisError):
        client = redis.Redis.from_url(url, socket_timeout=2)
        keys = list(client.scan_iter(match=prefix + "*", count=500))
        if keys:
            client.delete(*keys)
        client.close()


class PrivateRedis:
    """A redis-server subprocess on a free loopback port that a test may kill and restart, never
    the shared server that other processes' tests use. Skips the test when redis-server is not
    installed."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir = Path(f"/tmp/ds-test-redis-{self.port}")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, extra: tuple[str, ...] = ()) -> None:
        exe = require("redis-server", REDIS_PACKAGE)
        self.workdir.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # a TCP connect, not PING: the server may require a password
        if wait_for_port("127.0.0.1", self.port, 10.0):
            return
        self.kill()
        raise RuntimeError(f"private redis-server on port {self.port} did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None


@contextlib.contextmanager
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    try:
        yield server
    finally:
        server.kill()


# --- the app, run by `deepseek-serve serve` ----------------------------------------------------------
class CacheAppServer(ServeProcess):
    """The real server for the cache tests. Auth is off on loopback: every call is the anonymous key."""

    def __init__(self, data_dir: Path, **env: str) -> None:
        super().__init__(
            data_dir, ready_path="/health/live", timeout_s=180, **{"DS_AUTH": "off", "DS_LOG_LEVEL": "warning", **env}
        )
