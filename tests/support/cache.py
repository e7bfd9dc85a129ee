"""Helpers for the cache tests: a private redis-server on a free port, key clean-up, an app server."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import redis

from tests.support.server import ServeProcess, free_port

SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"


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
    """A redis-server subprocess on a free loopback port that a test may kill and restart.

    NOTE: never the shared server on 6379; other processes' tests use it.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir = Path(f"/tmp/ds-test-redis-{self.port}")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, extra: tuple[str, ...] = ()) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is not installed"
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
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                # NOTE: a TCP connect, not PING: the server may require a password
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
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
