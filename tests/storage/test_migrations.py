"""Migrations (empty -> head -> base -> head, on MariaDB and SQLite), the packaged scripts, the
`deepseek-serve db|keys|usage` commands, and deploy/mysql/init.sql's least-privilege user."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import Result
from sqlalchemy import inspect, text
from sqlalchemy.exc import DBAPIError
from typer.testing import CliRunner

from deepseek_serve.storage import migrate
from deepseek_serve.storage.db import create_db_engine
from deepseek_serve.storage.models import Base
from tests.support.storage import BACKENDS, database_url, mariadb, mariadb_exec, storage_settings

REPO = Path(__file__).resolve().parents[2]
APP_TABLES = {"api_keys", "usage_records", "conversations", "messages"}


async def _tables(engine: object) -> set[str]:
    async with engine.connect() as conn:  # type: ignore[attr-defined]
        return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))


@pytest.mark.parametrize("backend", BACKENDS)
async def test_empty_to_head_to_base_and_back(backend: str, tmp_path: Path) -> None:
    async with database_url(backend, tmp_path) as url:
        engine = create_db_engine(storage_settings(tmp_path, url), url=url)
        try:
            assert await migrate.current(engine) is None
            await migrate.upgrade(engine)
            assert await migrate.current(engine) == migrate.head_revision()
            assert await _tables(engine) >= APP_TABLES
            # the migrated schema is exactly what the models describe (no drift between the two)
            async with engine.connect() as conn:
                diff = await conn.run_sync(
                    lambda c: compare_metadata(
                        MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata
                    )
                )
            assert diff == []
            await migrate.upgrade(engine)  # idempotent
            await migrate.downgrade(engine, "base")
            assert await migrate.current(engine) is None
            assert not (APP_TABLES & await _tables(engine))
            await migrate.upgrade(engine, "head")
            assert await _tables(engine) >= APP_TABLES
        finally:
            await engine.dispose()


async def test_mariadb_tables_are_utf8mb4_innodb(tmp_path: Path) -> None:
    async with database_url("mariadb", tmp_path) as url:
        engine = create_db_engine(storage_settings(tmp_path, url), url=url)
        try:
            await migrate.upgrade(engine)
            async with engine.connect() as conn:
                rows = (
                    await conn.execute(
                        text(
                            "SELECT table_name, engine, table_collation FROM information_schema.tables "
                            "WHERE table_schema = DATABASE()"
                        )
                    )
                ).all()
        finally:
            await engine.dispose()
    found = {r[0]: (r[1], r[2]) for r in rows if r[0] in APP_TABLES}
    assert set(found) == APP_TABLES
    assert all(eng == "InnoDB" and coll.startswith("utf8mb4") for eng, coll in found.values())


def test_migration_scripts_ship_in_the_wheel(tmp_path: Path) -> None:
    """`db upgrade` must work from an installed package: the scripts are package data."""
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    import zipfile

    (wheel,) = out.glob("deepseek_serve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "deepseek_serve/storage/migrations/env.py",
        "deepseek_serve/storage/migrations/script.py.mako",
        "deepseek_serve/storage/migrations/versions/0001_initial.py",
    ):
        assert required in names


def _cli_process(args: list[str], data_dir: Path, url: str | None = None) -> subprocess.CompletedProcess[str]:
    """The real `deepseek-serve` entry point in a fresh process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DS_")}
    env.update({"DS_DATA_DIR": str(data_dir), "COLUMNS": "200"})
    if url:
        env["DS_DATABASE_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "deepseek_serve", *args],
        env=env,
        cwd=data_dir,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _cli(args: list[str], data_dir: Path, url: str | None = None) -> Result:
    """The same commands in-process (a fresh interpreter per call costs seconds on this machine)."""
    from deepseek_serve.cli import app

    env = {"DS_DATA_DIR": str(data_dir), "DS_DATABASE_URL": url or "", "COLUMNS": "200"}
    return CliRunner().invoke(app, args, env=env)


def test_cli_db_keys_usage_on_default_sqlite(tmp_path: Path) -> None:
    """The quick start: no DS_DATABASE_URL, SQLite under the data folder, created and migrated."""
    created = _cli_process(["keys", "create", "--admin", "--name", "ops", "--expires-in", "30d", "--json"], tmp_path)
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["key"].startswith("sk-") and key["scopes"] == ["admin", "inference"] and key["expires_at"]
    assert (tmp_path / "deepseek.db").exists()
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("deepseek.db*"))  # the db and its WAL
    assert key["key"].encode() not in stored and key["key"][3:].encode() not in stored  # hash only
    current = _cli(["db", "current"], tmp_path)
    assert current.exit_code == 0 and "up to date" in current.stdout
    listed = _cli(["keys", "list", "--json"], tmp_path)
    assert [k["name"] for k in json.loads(listed.stdout)] == ["ops"]
    assert key["key"] not in listed.stdout
    revoked = _cli(["keys", "revoke", key["id"]], tmp_path)
    assert revoked.exit_code == 0 and "revoked" in revoked.stdout
    assert json.loads(_cli(["keys", "list", "--json"], tmp_path).stdout) == []
    assert len(json.loads(_cli(["keys", "list", "--all", "--json"], tmp_path).stdout)) == 1
    missing = _cli(["keys", "revoke", "999"], tmp_path)
    assert missing.exit_code != 0 and "no key with id 999" in missing.stderr
    summary = _cli(["usage", "summary", "--json"], tmp_path)
    assert summary.exit_code == 0 and json.loads(summary.stdout) == []
    bad = _cli(["db", "purge", "--older-than", "ninety"], tmp_path)
    assert bad.exit_code != 0 and "invalid duration" in bad.stderr and "Traceback" not in bad.stderr
    purged = _cli(["db", "purge", "--older-than", "90d"], tmp_path)
    assert purged.exit_code == 0 and "deleted 0 usage records" in purged.stdout
    refused = _cli(["db", "downgrade", "base"], tmp_path)
    assert refused.exit_code != 0 and "--yes" in refused.stderr
    down = _cli(["db", "downgrade", "base", "--yes"], tmp_path)
    assert down.exit_code == 0 and "base" in down.stdout


def test_cli_reports_unreachable_database_without_traceback(tmp_path: Path) -> None:
    result = _cli_process(["db", "upgrade"], tmp_path, url="mysql+asyncmy://app:secret@127.0.0.1:1/none")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "database" in result.stderr
    assert "secret" not in result.stderr  # the password is masked


def _mysql_root(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*mariadb().mysql_args(), *args],
        input=stdin,
        text=True,
        capture_output=True,
        timeout=60,
    )


def _init_sql_for(database: str, user: str) -> str:
    sql = (REPO / "deploy/mysql/init.sql").read_text()
    sql = sql.replace("`deepseek`", f"`{database}`").replace("'deepseek'@", f"'{user}'@")
    sql = sql.replace("''deepseek''@", f"''{user}''@")
    statements = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    assert "deepseek`" not in statements and "'deepseek'" not in statements
    return sql


async def test_init_sql_least_privilege_user_can_migrate_and_serve(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    database, user, password = f"ds_test_storage_init_{tag}", f"ds_app_{tag}", f"pw-{uuid.uuid4().hex}"
    sql = _init_sql_for(database, user)
    try:
        run = _mysql_root([f"--init-command=SET @app_password='{password}'"], sql)
        assert run.returncode == 0, run.stderr
        grants = _mysql_root(["-N", "-e", f"SHOW GRANTS FOR '{user}'@'%'"])
        text_grants = grants.stdout
        assert "ALL PRIVILEGES" not in text_grants and "GRANT OPTION" not in text_grants
        assert re.search(rf"ON `{database}`\.\*", text_grants)
        db = mariadb()
        url = f"mysql+asyncmy://{user}:{password}@{db.host}:{db.port}/{database}"
        engine = create_db_engine(storage_settings(tmp_path, url), url=url)
        try:
            await migrate.upgrade(engine)  # the app user can run the migrations ...
            async with engine.begin() as conn:  # ... and use the tables
                await conn.execute(
                    text(
                        "INSERT INTO api_keys (name, prefix, key_hash, scopes, created_at) "
                        "VALUES ('x', 'abc', REPEAT('a', 64), 'inference', NOW())"
                    )
                )
            for forbidden in ("CREATE DATABASE ds_test_storage_should_not_exist", "SELECT COUNT(*) FROM mysql.user"):
                with pytest.raises(DBAPIError):
                    async with engine.connect() as conn:
                        await conn.execute(text(forbidden))
            await migrate.downgrade(engine, "base")
        finally:
            await engine.dispose()
        # running the script again (a re-deploy) keeps the same, narrow grants
        again = _mysql_root([], _init_sql_for(database, user))
        assert again.returncode == 0, again.stderr
    finally:
        await mariadb_exec(f"DROP DATABASE IF EXISTS `{database}`", f"DROP USER IF EXISTS '{user}'@'%'")
