"""deploy/backup.sh and deploy/restore.sh against the tests' MariaDB (`mariadb()`) and a Redis server of our own.

Each test module run uses its own database (ds_test_backup_<random>) and starts redis-server on a
free loopback port with the project's deploy/redis/redis.conf (only `dir` and `bind` changed), so
the shared Redis on 6379 and other processes' databases are never touched.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.support.net import free_port
from tests.support.storage import mariadb

ROOT = Path(__file__).resolve().parents[2]
BACKUP = ROOT / "deploy" / "backup.sh"
RESTORE = ROOT / "deploy" / "restore.sh"

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("mysql", "mysqldump", "redis-server", "redis-cli")),
    reason="needs the mysql/mysqldump clients and redis-server/redis-cli",
)


def _mysql(sql: str, database: str = "") -> str:
    cmd = [*mariadb().mysql_args(), "-N", "-B", "-e", sql]
    if database:
        cmd.append(database)
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


@dataclass
class RedisServer:
    """A redis-server process on 127.0.0.1:port with the project's config, data in `data_dir`."""

    conf: Path
    data_dir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", str(self.conf), "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.exceptions.ConnectionError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}") from None
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer within 15 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.client().shutdown(nosave=True)
            self.proc.wait(timeout=10)
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    data_dir = tmp_path / "redis-data"
    data_dir.mkdir()
    conf = tmp_path / "redis.conf"
    text = (ROOT / "deploy" / "redis" / "redis.conf").read_text()
    assert "\ndir /data\n" in text and "\nbind 0.0.0.0\n" in text
    conf.write_text(
        text.replace("\ndir /data\n", f"\ndir {data_dir}\n").replace("\nbind 0.0.0.0\n", "\nbind 127.0.0.1\n")
    )
    server = RedisServer(conf=conf, data_dir=data_dir, port=free_port())
    server.start()
    try:
        yield server
    finally:
        if server.proc and server.proc.poll() is None:
            server.proc.terminate()
            server.proc.wait(timeout=10)


@pytest.fixture
def database() -> Iterator[str]:
    name = f"ds_test_backup_{secrets.token_hex(4)}"
    _mysql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    try:
        yield name
    finally:
        _mysql(f"DROP DATABASE IF EXISTS `{name}`")


TABLES = ("api_keys", "usage_records", "messages")


def _seed(database: str, rows: int = 500) -> None:
    _mysql(
        """
        CREATE TABLE api_keys (id INT PRIMARY KEY AUTO_INCREMENT, name VARCHAR(64) NOT NULL,
            key_hash BINARY(32) NOT NULL, scopes JSON, expires_at DATETIME(6) NULL, UNIQUE KEY (name));
        CREATE TABLE usage_records (id BIGINT PRIMARY KEY AUTO_INCREMENT, key_id INT NOT NULL,
            prompt_tokens INT, completion_tokens INT, latency_ms DOUBLE, created_at DATETIME(6) NOT NULL,
            KEY (key_id, created_at), FOREIGN KEY (key_id) REFERENCES api_keys (id));
        CREATE TABLE messages (id BIGINT PRIMARY KEY AUTO_INCREMENT, role VARCHAR(16), content MEDIUMTEXT,
            blob_data BLOB);
        """,
        database,
    )
    values_keys = ",".join(
        f"('key-{i}', UNHEX(SHA2('k{i}', 256)), '[\"inference\"]', {'NULL' if i % 3 else 'NOW(6)'})" for i in range(20)
    )
    values_usage = ",".join(
        f"({1 + i % 20}, {i}, {i * 7 % 113}, {i / 3.0}, NOW(6) - INTERVAL {i} MINUTE)" for i in range(rows)
    )
    values_msgs = ",".join(
        f"('{('user', 'assistant')[i % 2]}', 'héllo 世界 \\'quoted\\' {i}\\n', UNHEX('{secrets.token_hex(16)}'))"
        for i in range(rows)
    )
    _mysql(
        f"INSERT INTO api_keys (name, key_hash, scopes, expires_at) VALUES {values_keys};"
        f"INSERT INTO usage_records (key_id, prompt_tokens, completion_tokens, latency_ms, created_at) "
        f"VALUES {values_usage};"
        f"INSERT INTO messages (role, content, blob_data) VALUES {values_msgs};",
        database,
    )


def _fingerprint(database: str) -> dict[str, tuple[int, int]]:
    """Row count and CHECKSUM TABLE of each table."""
    out: dict[str, tuple[int, int]] = {}
    for table in TABLES:
        count = int(_mysql(f"SELECT COUNT(*) FROM `{table}`", database).strip())
        checksum_line = _mysql(f"CHECKSUM TABLE `{table}` EXTENDED", database).split()
        out[table] = (count, int(checksum_line[-1]))
    return out


def _redis_fingerprint(client: redis.Redis) -> dict[bytes, tuple[object, bool]]:
    """Every key's DUMP payload and whether it has a TTL."""
    return {key: (client.dump(key), client.ttl(key) > 0) for key in client.scan_iter(count=1000)}


def _seed_redis(client: redis.Redis) -> None:
    pipe = client.pipeline()
    for i in range(200):
        pipe.set(f"ds:cache:{i}", secrets.token_bytes(64))
    pipe.hset("ds:session:abc", mapping={"key_id": "7", "conversation": "c-1"})
    pipe.expire("ds:session:abc", 3600)
    pipe.zadd("ds:rl:key7", {f"req-{i}": i for i in range(50)})
    pipe.rpush("ds:list", *[str(i) for i in range(30)])
    pipe.execute()


def _run(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=120)


def _backup(dest: Path, database: str, port: int, *extra: str) -> Path:
    res = _run(
        BACKUP,
        "--mode",
        "direct",
        "--dest",
        str(dest),
        "--mysql-host",
        mariadb().host,
        "--mysql-port",
        str(mariadb().port),
        "--mysql-database",
        database,
        "--redis-port",
        str(port),
        *extra,
    )
    assert res.returncode == 0, res.stderr
    archive = Path(res.stdout.strip().splitlines()[-1])
    assert archive.is_file() and archive.parent == dest
    return archive


def _restore(archive: Path, database: str, server: RedisServer, *extra: str) -> subprocess.CompletedProcess[str]:
    return _run(
        RESTORE,
        "--mode",
        "direct",
        "--yes",
        "--mysql-host",
        mariadb().host,
        "--mysql-port",
        str(mariadb().port),
        "--mysql-database",
        database,
        "--redis-dir",
        str(server.data_dir),
        "--redis-port",
        str(server.port),
        *extra,
        str(archive),
    )


def test_backup_drop_restore_reproduces_mysql_and_redis(
    tmp_path: Path, database: str, redis_server: RedisServer
) -> None:
    _seed(database)
    _seed_redis(redis_server.client())
    before = _fingerprint(database)
    redis_before = _redis_fingerprint(redis_server.client())
    assert before["usage_records"][0] == 500 and len(redis_before) == 203

    archive = _backup(tmp_path / "backups", database, redis_server.port)
    sidecar = archive.with_name(archive.name + ".sha256")
    assert sidecar.read_text().split()[0] == hashlib.sha256(archive.read_bytes()).hexdigest()
    with tarfile.open(archive) as tar:
        assert {m.name.lstrip("./") for m in tar.getmembers() if m.isfile()} == {
            "mysql.sql",
            "redis.rdb",
            "SHA256SUMS",
            "MANIFEST",
        }

    # disaster: tables dropped, Redis data gone
    _mysql("SET FOREIGN_KEY_CHECKS=0; DROP TABLE usage_records, messages, api_keys;", database)
    assert _mysql("SHOW TABLES", database).strip() == ""
    redis_server.stop()
    shutil.rmtree(redis_server.data_dir)
    redis_server.data_dir.mkdir()

    res = _restore(archive, database, redis_server)
    assert res.returncode == 0, res.stderr
    assert _fingerprint(database) == before

    # Redis loads the snapshot with appendonly on (the project's config) and keeps TTLs
    redis_server.start()
    assert _redis_fingerprint(redis_server.client()) == redis_before
    # and the rebuilt AOF carries new writes across a restart
    redis_server.client().set("after-restore", "1")
    redis_server.stop()
    redis_server.start()
    assert redis_server.client().get("after-restore") == b"1"
    assert redis_server.client().dbsize() == len(redis_before) + 1


def test_damaged_or_unverifiable_archives_are_refused(tmp_path: Path, database: str, redis_server: RedisServer) -> None:
    _seed(database, rows=50)
    _seed_redis(redis_server.client())
    archive = _backup(tmp_path / "backups", database, redis_server.port)
    assert _run(RESTORE, "--verify-only", str(archive)).returncode == 0

    # the data moves on after the backup; a refused restore must leave it as it is
    _mysql("DELETE FROM messages WHERE id % 2 = 0", database)
    current = _fingerprint(database)

    def damaged(name: str) -> Path:
        copy = tmp_path / name
        shutil.copy(archive, copy)
        shutil.copy(archive.with_name(archive.name + ".sha256"), copy.with_name(copy.name + ".sha256"))
        return copy

    flipped = damaged("flipped.tar.gz")
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))

    truncated = damaged("truncated.tar.gz")
    truncated.write_bytes(archive.read_bytes()[:-100])

    no_sidecar = damaged("nosum.tar.gz")
    no_sidecar.with_name(no_sidecar.name + ".sha256").unlink()

    # a part changed inside and the outer checksum recomputed: SHA256SUMS inside catches it
    inner = damaged("inner.tar.gz")
    unpacked = tmp_path / "unpacked"
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="data")
    dump = unpacked / "mysql.sql"
    dump.write_text(dump.read_text().replace("INSERT INTO `api_keys`", "INSERT INTO `api_keys` -- x\n", 1))
    with tarfile.open(inner, "w:gz") as tar:
        for part in sorted(unpacked.iterdir()):
            tar.add(part, arcname=f"./{part.name}")
    inner.with_name(inner.name + ".sha256").write_text(
        f"{hashlib.sha256(inner.read_bytes()).hexdigest()}  {inner.name}\n"
    )

    for bad, reason in (
        (flipped, "sha256 mismatch"),
        (truncated, "sha256 mismatch"),
        (no_sidecar, "checksum file"),
        (inner, "fails its checksum"),
    ):
        res = _restore(bad, database, redis_server, "--no-redis")
        assert res.returncode == 3, (bad.name, res.stderr)
        assert "REFUSED" in res.stderr and reason in res.stderr, (bad.name, res.stderr)
        assert _fingerprint(database) == current

    # Redis is restored by files only while the server is stopped
    res = _restore(archive, database, redis_server, "--no-mysql")
    assert res.returncode == 1 and "stop it before restoring" in res.stderr
    assert redis_server.client().dbsize() == 203


def test_retention_keeps_newest_archives(tmp_path: Path, database: str, redis_server: RedisServer) -> None:
    _seed(database, rows=5)
    dest = tmp_path / "backups"
    made = [_backup(dest, database, redis_server.port, "--keep", "2", "--no-redis") for _ in range(3)]
    assert len({p.name for p in made}) == 3
    kept = sorted(p.name for p in dest.glob("deepseek-backup-*.tar.gz"))
    assert kept == sorted(p.name for p in made[1:])
    assert sorted(p.name for p in dest.glob("*.sha256")) == [f"{k}.sha256" for k in kept]

    # by age: an archive dated 10 days back goes, the fresh ones stay
    old = made[2].with_name("deepseek-backup-20000101T000000Z.tar.gz")
    shutil.copy(made[2], old)
    shutil.copy(made[2].with_name(made[2].name + ".sha256"), old.with_name(old.name + ".sha256"))
    ten_days_ago = time.time() - 10 * 86400
    os.utime(old, (ten_days_ago, ten_days_ago))
    _backup(dest, database, redis_server.port, "--keep", "0", "--max-age-days", "7", "--no-redis")
    names = {p.name for p in dest.glob("deepseek-backup-*.tar.gz")}
    assert old.name not in names and not old.with_name(old.name + ".sha256").exists()
    assert len(names) == 3


def test_bad_arguments_are_rejected_without_side_effects(tmp_path: Path) -> None:
    dest = tmp_path / "never"
    res = _run(BACKUP, "--mode", "direct", "--dest", str(dest), "--keep", "many")
    assert res.returncode == 2 and "--keep must be a whole number" in res.stderr
    assert not dest.exists()
    res = _run(BACKUP, "--mode", "direct", "--mysql-database", "x; DROP DATABASE test", "--dest", str(dest))
    assert res.returncode == 2 and "database name" in res.stderr
    res = _run(RESTORE, str(tmp_path / "missing.tar.gz"))
    assert res.returncode == 3 and "does not exist" in res.stderr
    for script in (BACKUP, RESTORE):
        res = _run(script, "--help")
        assert res.returncode == 0 and "Usage:" in res.stdout
