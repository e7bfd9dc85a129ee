"""Helpers for the cache tests: a private redis-server on a free port, key clean-up, an app server."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import redis

SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unique_prefix() -> str:
    """A key prefix of our own, so tests never touch other agents' keys on the shared Redis."""
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

    NOTE: never the shared server on 6379; other agents' tests use it.
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
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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
REPO = Path(__file__).resolve().parents[1]


class CacheAppServer:
    """`deepseek-serve serve` (as `python -m deepseek_serve serve`) with the real default model, in a
    subprocess on a free loopback port. Auth is off on loopback: every call is the anonymous key."""

    def __init__(self, data_dir: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.stderr_path = data_dir / "server.stderr"
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("DS_") and k != "PROMETHEUS_MULTIPROC_DIR"}
        paths = (str(REPO / "src"), os.environ.get("PYTHONPATH", ""))
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        self.env.update({"DS_DATA_DIR": str(data_dir), "DS_MAX_BATCH_SIZE": "4", "DS_CONTEXT_LENGTH": "2048",
                         "DS_N_THREADS": "1", "DS_AUTH": "off", "DS_LOG_LEVEL": "warning"})
        self.env.update(env)
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> CacheAppServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        stderr = self.stderr_path.open("wb")
        command = [sys.executable, "-m", "deepseek_serve", "serve", "--host", "127.0.0.1",
                   "--port", str(self.port)]
        self.proc = subprocess.Popen(command, env=self.env, cwd=self.data_dir, stdout=subprocess.DEVNULL,
                                     stderr=stderr, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.stderr()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health/live", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.__exit__()
        raise RuntimeError(f"server not up in 180s:\n{self.stderr()[-3000:]}")

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
