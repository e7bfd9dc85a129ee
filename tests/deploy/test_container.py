"""The Docker image, built and run for real with podman (opt-in: DS_TEST_CONTAINERS=1).

Builds the Dockerfile's default (CPU) target, then runs it the way compose.yaml does: non-root,
read-only root filesystem, /data and /models on volumes, /tmp on tmpfs. The container must become
ready, answer a chat completion from the official `openai` client (the default model ships inside
the image, so nothing is downloaded), and exit 0 on SIGTERM within the drain timeout.

The first build compiles llama.cpp (10-20 min on 2 cores); later builds reuse that layer.
Without a registry, deploy/docker/podman-standin-base.sh makes the python:3.11-slim-bookworm base.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.net import free_port

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("DS_TEST_IMAGE", "localhost/deepseek-serve:test")
MAX_IMAGE_BYTES = 800 * 1000 * 1000
DRAIN_TIMEOUT_S = 20.0

pytestmark = [
    pytest.mark.container,
    pytest.mark.skipif(os.environ.get("DS_TEST_CONTAINERS") != "1", reason="opt-in: DS_TEST_CONTAINERS=1"),
    pytest.mark.skipif(shutil.which("podman") is None, reason="needs podman"),
    pytest.mark.timeout(3600),
]


def _podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=check)


def _build_volumes(tmp: Path) -> list[str]:
    """Build-time mounts so pip trusts the host's CA bundle (for a TLS-inspecting proxy, as here)."""
    bundle = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    if not bundle or not Path(bundle).is_file():
        return []
    conf = tmp / "pip.conf"
    conf.write_text("[global]\ncert = /etc/ssl/certs/host-ca.crt\n")
    return ["-v", f"{conf}:/etc/pip.conf:ro", "-v", f"{bundle}:/etc/ssl/certs/host-ca.crt:ro"]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    if os.environ.get("DS_TEST_IMAGE_PREBUILT") != "1":
        subprocess.run(["bash", str(ROOT / "deploy/docker/podman-standin-base.sh")], check=True, timeout=1200)
        tmp = tmp_path_factory.mktemp("build")
        log = tmp / "build.log"
        with log.open("w") as out:
            rc = subprocess.run(
                [
                    "podman",
                    "build",
                    "--format",
                    "docker",
                    "--network",
                    "host",
                    *_build_volumes(tmp),
                    "-t",
                    IMAGE,
                    str(ROOT),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=3000,
            ).returncode
        assert rc == 0, log.read_text()[-4000:]
    return IMAGE


def test_image_metadata_and_size(image: str) -> None:
    info = json.loads(_podman("image", "inspect", image).stdout)[0]
    config = info["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["tini", "--", "deepseek-serve"]
    assert config["Cmd"] == ["serve", "--host", "0.0.0.0"]
    assert set(config["Volumes"]) == {"/data", "/models"}
    assert config["StopSignal"] == "SIGTERM"
    healthcheck = info.get("Healthcheck") or config.get("Healthcheck")  # podman: top level
    assert healthcheck["Test"] == ["CMD", "python3", "/usr/local/lib/deepseek-serve/healthcheck.py"]
    size = int(info["Size"])
    print(f"image {image}: {size / 1e6:.0f} MB")
    assert size <= MAX_IMAGE_BYTES, f"{size / 1e6:.0f} MB > 800 MB"
    # no compilers and no torch in the CPU runtime
    res = _podman(
        "run",
        "--rm",
        "--network",
        "host",
        "--entrypoint",
        "sh",
        image,
        "-c",
        "command -v gcc cc g++ cmake; python3 -c 'import torch' 2>/dev/null && echo torch; true",
    )
    assert res.stdout.strip() == ""


@pytest.fixture
def container(image: str) -> Iterator[tuple[str, int, str]]:
    name = f"ds-test-{secrets.token_hex(4)}"
    port = free_port()
    admin_key = "sk-" + secrets.token_hex(24)
    volumes = [f"{name}-data", f"{name}-models"]
    for v in volumes:
        _podman("volume", "create", v)
    _podman(
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "host",
        "--read-only",
        "--tmpfs",
        "/tmp:size=256m,mode=1777",
        "-v",
        f"{volumes[0]}:/data",
        "-v",
        f"{volumes[1]}:/models",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "-e",
        f"DS_PORT={port}",
        "-e",
        f"DS_ADMIN_KEY={admin_key}",
        "-e",
        f"DS_DRAIN_TIMEOUT_S={DRAIN_TIMEOUT_S}",
        "-e",
        "DS_N_THREADS=2",
        "-e",
        "DS_CONTEXT_LENGTH=2048",
        "-e",
        "DS_MODEL=smollm2-135m-instruct",
        image,
    )
    try:
        yield name, port, admin_key
    finally:
        logs = _podman("logs", "--tail", "40", name, check=False)
        print(logs.stdout[-3000:], logs.stderr[-3000:])
        _podman("rm", "-f", "-v", "-t", "0", name, check=False)
        for v in volumes:
            _podman("volume", "rm", "-f", v, check=False)


def _wait_ready(name: str, port: int, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = json.loads(_podman("inspect", name).stdout)[0]["State"]
        if not state["Running"]:
            logs = _podman("logs", name).stderr[-3000:]
            raise AssertionError(f"container exited with {state['ExitCode']}: {logs}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise AssertionError(f"not ready within {timeout_s} s")


def test_container_runs_read_only_non_root_answers_and_stops_on_sigterm(
    container: tuple[str, int, str],
) -> None:
    from openai import OpenAI

    name, port, admin_key = container
    _wait_ready(name, port)

    # the image's own HEALTHCHECK command passes
    assert _podman("healthcheck", "run", name, check=False).returncode == 0

    # non-root, read-only root, writable volumes
    assert _podman("exec", name, "id", "-u").stdout.strip() == "10001"
    probe = _podman("exec", name, "sh", "-c", "touch /opt/venv/x 2>&1; touch /data/x && echo data-ok", check=False)
    assert "Read-only file system" in probe.stdout and "data-ok" in probe.stdout

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=admin_key, max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
    )
    assert reply.choices[0].message.content
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8

    # auth is on in the container (it binds 0.0.0.0): a wrong key is refused in OpenAI's shape
    bad = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-" + "0" * 40, max_retries=0)
    with pytest.raises(Exception) as err:
        bad.models.list()
    assert getattr(err.value, "status_code", None) == 401

    # SIGTERM reaches the server through tini; it drains and exits 0
    started = time.monotonic()
    _podman("kill", "--signal", "TERM", name)
    code = _podman("wait", name, timeout=DRAIN_TIMEOUT_S + 30).stdout.strip()
    elapsed = time.monotonic() - started
    assert code == "0", _podman("logs", name).stderr[-3000:]
    assert elapsed < DRAIN_TIMEOUT_S + 5


def _mysql(sql: str) -> str:
    return subprocess.run(
        ["mysql", "-h", "127.0.0.1", "-u", "root", "-N", "-B", "-e", sql],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout


@pytest.mark.skipif(
    shutil.which("mysql") is None or shutil.which("redis-server") is None,
    reason="needs the MariaDB client and redis-server",
)
def test_container_with_mysql_and_redis_as_in_compose(image: str, tmp_path: Path) -> None:
    """The image against the real MariaDB (a user with only init.sql's grants) and a password-protected
    Redis running deploy/redis/redis.conf; then backup.sh captures what the app wrote."""
    from openai import OpenAI

    tag = secrets.token_hex(4)
    db, user, db_password = f"ds_test_ctr_{tag}", f"ds_ctr_{tag}", secrets.token_hex(16)
    redis_password = secrets.token_hex(16)
    redis_port, port = free_port(), free_port()
    admin_key = "sk-" + secrets.token_hex(24)
    # the grants deploy/mysql/init.sql gives the application user, on its own database only
    grants = "SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, INDEX, DROP, REFERENCES"
    _mysql(
        f"CREATE DATABASE `{db}` CHARACTER SET utf8mb4; "
        + "".join(
            f"CREATE USER '{user}'@'{h}' IDENTIFIED BY '{db_password}'; GRANT {grants} ON `{db}`.* TO '{user}'@'{h}'; "
            for h in ("localhost", "%")
        )
    )
    assert grants.split(", ")[-1] in (ROOT / "deploy/mysql/init.sql").read_text()

    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    conf = tmp_path / "redis.conf"
    conf.write_text(
        (ROOT / "deploy/redis/redis.conf")
        .read_text()
        .replace("dir /data", f"dir {redis_dir}")
        .replace("bind 0.0.0.0", "bind 127.0.0.1")
    )
    redis_proc = subprocess.Popen(
        ["redis-server", str(conf), "--port", str(redis_port), "--requirepass", redis_password],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    name = f"ds-test-stack-{tag}"
    try:
        _podman(
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "host",
            "--read-only",
            "--tmpfs",
            "/tmp:size=256m,mode=1777",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "-e",
            f"DS_PORT={port}",
            "-e",
            f"DS_ADMIN_KEY={admin_key}",
            "-e",
            "DS_N_THREADS=2",
            "-e",
            f"DS_DATABASE_URL=mysql+asyncmy://{user}:{db_password}@127.0.0.1:3306/{db}?charset=utf8mb4",
            "-e",
            "DS_DB_AUTO_MIGRATE=true",
            "-e",
            f"DS_REDIS_URL=redis://:{redis_password}@127.0.0.1:{redis_port}/0",
            "-e",
            f"DS_REDIS_KEY_PREFIX=dstest{tag}:",
            "-e",
            "DS_MODEL=smollm2-135m-instruct",
            image,
        )
        _wait_ready(name, port)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=admin_key, max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        for _ in range(2):
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
            )
            assert reply.choices[0].message.content is not None

        # the app migrated its schema with the least-privilege user and wrote usage and keys
        tables = set(_mysql(f"SHOW TABLES FROM `{db}`").split())
        assert {"api_keys", "usage_records", "alembic_version"} <= tables
        deadline = time.monotonic() + 30
        while int(_mysql(f"SELECT COUNT(*) FROM `{db}`.usage_records").strip()) < 2:
            assert time.monotonic() < deadline, "usage records not written"
            time.sleep(1)
        env = {**os.environ, "MYSQL_PWD": "", "REDISCLI_AUTH": redis_password}
        keys = subprocess.run(
            ["redis-cli", "-p", str(redis_port), "--scan", "--pattern", f"dstest{tag}:*"],
            capture_output=True,
            text=True,
            env=env,
            timeout=10,
        ).stdout.split()
        assert keys, "nothing written to Redis under the key prefix"

        # a backup of this stack verifies
        res = subprocess.run(
            [
                "bash",
                str(ROOT / "deploy/backup.sh"),
                "--mode",
                "direct",
                "--dest",
                str(tmp_path / "bk"),
                "--mysql-database",
                db,
                "--redis-port",
                str(redis_port),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr
        archive = res.stdout.strip()
        verify = subprocess.run(
            ["bash", str(ROOT / "deploy/restore.sh"), "--verify-only", archive],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert verify.returncode == 0, verify.stderr

        _podman("kill", "--signal", "TERM", name)
        assert _podman("wait", name, timeout=60).stdout.strip() == "0"
    finally:
        logs = _podman("logs", "--tail", "20", name, check=False)
        print(logs.stdout[-2000:], logs.stderr[-2000:])
        _podman("rm", "-f", "-v", "-t", "0", name, check=False)
        redis_proc.terminate()
        redis_proc.wait(timeout=10)
        _mysql(f"DROP DATABASE IF EXISTS `{db}`; DROP USER IF EXISTS '{user}'@'localhost', '{user}'@'%';")
