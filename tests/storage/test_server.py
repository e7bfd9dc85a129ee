"""A real server process, the official `openai` client, and a MariaDB outage in the middle of a run
of requests: every request is answered and every one is accounted for (rows == requests)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from deepseek_serve.storage.keys import generate_secret
from tests.support.server import ServeProcess
from tests.support.storage import PrivateMariaDB

pytestmark = pytest.mark.slow

REQUESTS = 40
KILL_AT, RESTART_AT = 10, 25


def _query(port: int, sql: str) -> list[str]:
    out = subprocess.run(
        ["mysql", "-uroot", "-h127.0.0.1", f"-P{port}", "-N", "-B", "app", "-e", sql],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return out.split()


def _count(port: int) -> int:
    return int(_query(port, "SELECT COUNT(*) FROM usage_records")[0])


def test_zero_usage_records_lost_when_mariadb_dies_under_load(tmp_path: Path) -> None:
    db = PrivateMariaDB(tmp_path / "mariadb")
    db.install()
    db.start()
    server: ServeProcess | None = None
    try:
        subprocess.run(
            ["mysql", "-uroot", "-h127.0.0.1", f"-P{db.port}", "-e", "CREATE DATABASE app CHARACTER SET utf8mb4"],
            check=True,
            timeout=30,
        )
        admin_key = generate_secret()
        server = ServeProcess(
            tmp_path / "data",
            DS_DATABASE_URL=db.url("app"),
            DS_DB_AUTO_MIGRATE="true",
            DS_AUTH="on",
            DS_ADMIN_KEY=admin_key,
            DS_USAGE_FLUSH_INTERVAL_S="0.2",
            DS_DB_CONNECT_TIMEOUT_S="1",
            DS_REDIS_URL="",
            DS_RESPONSE_CACHE="false",
            DS_LOG_LEVEL="warning",
        )
        server.start()
        base = server.url

        created = httpx.post(
            f"{base}/admin/keys", json={"name": "load"}, headers={"Authorization": f"Bearer {admin_key}"}, timeout=30
        )
        assert created.status_code == 201, created.text
        client = OpenAI(base_url=f"{base}/v1", api_key=created.json()["key"], max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        ids: list[str] = []
        for i in range(REQUESTS):
            if i == KILL_AT:
                db.kill()
            if i == RESTART_AT:
                db.start()
            answer = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=1, temperature=0
            )
            assert answer.usage is not None and answer.usage.completion_tokens == 1
            ids.append(answer.id)
            if KILL_AT <= i < RESTART_AT:
                time.sleep(0.1)  # let the outage last a few flush intervals
        deadline = time.monotonic() + 60
        while _count(db.port) < REQUESTS:
            assert time.monotonic() < deadline, f"only {_count(db.port)} of {REQUESTS} rows"
            time.sleep(0.3)
        time.sleep(0.5)
        assert _count(db.port) == REQUESTS  # and no duplicates from the replay
        assert set(_query(db.port, "SELECT request_id FROM usage_records")) == set(ids)
        assert "spooling" in server.stderr()  # the outage really sent records through the spool
    finally:
        if server is not None:
            server.stop()
        db.stop()
