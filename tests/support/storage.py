"""Helpers for the storage tests: a private database per module on the shared MariaDB, or SQLite.

NOTE: databases are named `ds_test_storage_<random>` and dropped afterwards, so tests never touch
other processes' data on the shared server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from deepseek_serve.config import Settings, load_settings

MARIADB_HOST = os.environ.get("DS_TEST_MARIADB_HOST", "127.0.0.1")
MARIADB_PORT = int(os.environ.get("DS_TEST_MARIADB_PORT", "3306"))
MARIADB_ROOT = f"mysql+asyncmy://root@{MARIADB_HOST}:{MARIADB_PORT}/"
BACKENDS = ("sqlite", "mariadb")


def storage_settings(data_dir: Path, url: str, **overrides: object) -> Settings:
    # NOTE: _env_file=None: a developer's .env never leaks into tests.
    base: dict[str, object] = {
        "_env_file": None,
        "data_dir": data_dir,
        "database_url": url,
        "usage_flush_interval_s": 0.05,
        "db_connect_timeout_s": 2.0,
        "db_pool_timeout_s": 5.0,
    }
    base.update(overrides)
    return load_settings(**base)


async def mariadb_exec(*statements: str) -> None:
    engine = create_async_engine(MARIADB_ROOT, pool_size=1)
    try:
        async with engine.begin() as conn:
            for stmt in statements:
                await conn.execute(text(stmt))
    finally:
        await engine.dispose()


@asynccontextmanager
async def database_url(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database of the given backend; removed on exit."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / f'test-{uuid.uuid4().hex[:8]}.db'}"
        return
    name = f"ds_test_storage_{uuid.uuid4().hex[:10]}"
    await mariadb_exec(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    try:
        yield f"mysql+asyncmy://root@{MARIADB_HOST}:{MARIADB_PORT}/{name}"
    finally:
        await wait_for_mariadb(30.0)
        await mariadb_exec(f"DROP DATABASE IF EXISTS `{name}`")


async def mariadb_answers() -> bool:
    try:
        await asyncio.wait_for(mariadb_exec("SELECT 1"), 3.0)
        return True
    except Exception:
        return False


async def wait_for_mariadb(timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await mariadb_answers():
        if loop.time() > deadline:
            raise TimeoutError(f"MariaDB on {MARIADB_HOST}:{MARIADB_PORT} did not answer in {timeout_s}s")
        await asyncio.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateMariaDB:
    """A mariadbd of our own (own datadir, free loopback port) that a test may kill and restart.

    NOTE: the outage tests kill this one, never the shared server on 3306 other processes' tests use.
    It is the same MariaDB binary, reached over TCP like any other.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.datadir = workdir / "data"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, database: str = "") -> str:
        return f"mysql+asyncmy://root@127.0.0.1:{self.port}/{database}"

    def install(self) -> None:
        self.datadir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "mariadb-install-db",
                "--no-defaults",
                f"--datadir={self.datadir}",
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
        )

    def start(self, timeout_s: float = 60.0) -> None:
        log = (self.workdir / "mariadb.log").open("ab")
        self.proc = subprocess.Popen(
            [
                "mariadbd",
                "--no-defaults",
                f"--datadir={self.datadir}",
                "--user=root",
                f"--socket={self.workdir / 'mysqld.sock'}",
                f"--port={self.port}",
                "--bind-address=127.0.0.1",
                "--innodb-buffer-pool-size=16M",
                "--skip-log-bin",
                "--skip-name-resolve",
                "--character-set-server=utf8mb4",
                "--collation-server=utf8mb4_unicode_ci",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.workdir / "mariadb.log").read_text(errors="replace")[-3000:])
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.1)
        raise RuntimeError("private mariadbd did not listen in time")

    def kill(self) -> None:
        """SIGKILL: the harshest outage (no clean shutdown, connections drop mid-query)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
