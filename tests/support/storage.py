"""Helpers for the storage tests: the MariaDB the tests use (`mariadb()`), a private database per
module on it or on SQLite, and a private mariadbd that a test may kill.

Databases are named `ds_test_storage_<random>` and dropped afterwards, so tests never touch other
processes' data on a shared server.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from deepseek_serve.config import Settings, load_settings
from tests.support.net import free_port, port_open, wait_for_port
from tests.support.services import installed, on_session_end, require, skip

# The shared server the tests use when it answers (root, no password).
MARIADB_HOST = os.environ.get("DS_TEST_MARIADB_HOST", "127.0.0.1")
MARIADB_PORT = int(os.environ.get("DS_TEST_MARIADB_PORT", "3306"))
BACKENDS = ("sqlite", "mariadb")
MARIADB_PACKAGE = "mariadb-server"


@dataclass(frozen=True)
class MariaDB:
    """Address of a MariaDB server that answers, reached as root without a password."""

    host: str
    port: int

    def url(self, database: str = "") -> str:
        return f"mysql+asyncmy://root@{self.host}:{self.port}/{database}"

    def mysql_args(self) -> list[str]:
        """The `mysql` client's arguments that reach this server as root."""
        return ["mysql", "-uroot", f"-h{self.host}", f"-P{self.port}"]


_mariadb: MariaDB | None = None
_mariadb_error: BaseException | None = None


def mariadb() -> MariaDB:
    """The MariaDB for this session: the shared one on DS_TEST_MARIADB_HOST:DS_TEST_MARIADB_PORT
    (127.0.0.1:3306) when it accepts connections, else a throwaway mariadbd started once (stopped
    when the session ends); skips the test when neither is possible."""
    global _mariadb, _mariadb_error
    if _mariadb is not None:
        return _mariadb
    if _mariadb_error is not None:
        raise _mariadb_error
    if port_open(MARIADB_HOST, MARIADB_PORT):
        _mariadb = MariaDB(MARIADB_HOST, MARIADB_PORT)
        return _mariadb
    if installed("mariadbd") is None or installed("mariadb-install-db") is None:
        skip(
            f"MariaDB not running on {MARIADB_HOST}:{MARIADB_PORT} and mariadbd not installed: "
            f"apt-get install {MARIADB_PACKAGE}, or set DS_TEST_MARIADB_HOST/DS_TEST_MARIADB_PORT"
        )
    workdir = Path(tempfile.mkdtemp(prefix="ds-test-mariadb-"))
    server = PrivateMariaDB(workdir)
    on_session_end(lambda: (server.stop(), shutil.rmtree(workdir, ignore_errors=True)))
    try:
        server.install()
        server.start(init_sql="CREATE DATABASE IF NOT EXISTS test;\n")  # as the shared server has
    except BaseException as exc:
        _mariadb_error = exc
        raise
    _mariadb = MariaDB("127.0.0.1", server.port)
    return _mariadb


def storage_settings(data_dir: Path, url: str, **overrides: object) -> Settings:
    base: dict[str, object] = {
        "_env_file": None,  # a developer's .env never leaks into tests
        "data_dir": data_dir,
        "database_url": url,
        "usage_flush_interval_s": 0.05,
        "db_connect_timeout_s": 2.0,
        "db_pool_timeout_s": 5.0,
    }
    base.update(overrides)
    return load_settings(**base)


async def mariadb_exec(*statements: str) -> None:
    """Runs `statements` as root on `mariadb()` (no database selected)."""
    engine = create_async_engine(mariadb().url(), pool_size=1)
    try:
        async with engine.begin() as conn:
            for stmt in statements:
                await conn.execute(text(stmt))
    finally:
        await engine.dispose()


async def create_database(prefix: str = "ds_test_storage") -> str:
    """A new empty utf8mb4 database on `mariadb()`; returns its name (`<prefix>_<random>`)."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    await mariadb_exec(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    return name


@asynccontextmanager
async def database_url(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database of the given backend; removed on exit."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / f'test-{uuid.uuid4().hex[:8]}.db'}"
        return
    name = await create_database()
    try:
        yield mariadb().url(name)
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
            db = mariadb()
            raise TimeoutError(f"MariaDB on {db.host}:{db.port} did not answer in {timeout_s}s")
        await asyncio.sleep(0.2)


class PrivateMariaDB:
    """A mariadbd of our own (own datadir, free loopback port) that a test may kill and restart.

    The outage tests kill this one, never a shared server that other processes' tests use. It is
    the same MariaDB binary, reached over TCP like any other. Skips the test when mariadbd is not
    installed.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.datadir = workdir / "data"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, database: str = "") -> str:
        return f"mysql+asyncmy://root@127.0.0.1:{self.port}/{database}"

    def install(self) -> None:
        require("mariadbd", MARIADB_PACKAGE)
        self.datadir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                require("mariadb-install-db", MARIADB_PACKAGE),
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

    def start(self, timeout_s: float = 60.0, init_sql: str = "") -> None:
        """Starts mariadbd (running `init_sql` first) and waits until it listens."""
        log_path = self.workdir / "mariadb.log"
        init = []
        if init_sql:
            init_file = self.workdir / "init.sql"
            init_file.write_text(init_sql)
            init = [f"--init-file={init_file}"]
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    require("mariadbd", MARIADB_PACKAGE),
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
                    *init,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(log_path.read_text(errors="replace")[-3000:])
            if wait_for_port("127.0.0.1", self.port, 0.1):
                return
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
