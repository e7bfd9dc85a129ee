"""compose.yaml: valid against the Compose specification's JSON schema, and the stack's policies.

No Docker engine or registry is reachable here, so `docker compose up` cannot run: the file is
checked against the schema and against the rules the deployment promises (hardening, networks,
healthchecks, secrets, settings defaults in step with Settings).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from deepseek_serve.config import Settings

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT.parent / "shared" / "schemas" / "compose-spec.json"
CORE = {"deepseek-app", "mysql", "redis"}
MONITORING = {"prometheus", "alertmanager", "grafana", "mysqld-exporter", "redis-exporter", "node-exporter"}
SCALE = {"gateway", "engine"}  # profile `scale`: checked in tests/deploy/test_gateway_compose.py
SECRETS = {
    "MYSQL_ROOT_PASSWORD",
    "MYSQL_PASSWORD",
    "MYSQL_EXPORTER_PASSWORD",
    "REDIS_PASSWORD",
    "GRAFANA_ADMIN_PASSWORD",
    "DS_ADMIN_KEY",
}
VAR = re.compile(r"\$\{([A-Z0-9_]+)(?:(:?[-?])([^}]*))?\}")


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load(ROOT / "compose.yaml")


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    if not SCHEMA.exists():
        pytest.skip(f"{SCHEMA} is not here")
    return json.loads(SCHEMA.read_text())


@pytest.mark.parametrize("name", ["compose.yaml", "deploy/compose.gpu.yaml"])
def test_files_validate_against_the_compose_schema(schema: dict[str, Any], name: str) -> None:
    jsonschema.Draft7Validator(schema).validate(_load(ROOT / name))


def test_schema_catches_a_broken_file(schema: dict[str, Any], compose: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["redis"]["restart_policy"] = "always"  # not a Compose key
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(broken)


def test_services_and_profiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == CORE | MONITORING | SCALE
    for name in CORE:
        assert "profiles" not in services[name], name
    for name in MONITORING:
        assert services[name]["profiles"] == ["monitoring"], name
    assert services["mysql"]["image"] == "mysql:8.0"
    assert services["redis"]["image"].startswith("redis:7")


def test_every_service_is_hardened(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        assert svc["restart"] == "unless-stopped", name
        assert svc["read_only"] is True, name
        assert svc["cap_drop"] == ["ALL"] and "cap_add" not in svc, name
        assert "no-new-privileges:true" in svc["security_opt"], name
        assert svc.get("privileged") is not True, name
        assert svc["logging"]["driver"] == "json-file", name
        assert {"max-size", "max-file"} <= svc["logging"]["options"].keys(), name
        resources = svc["deploy"]["resources"]
        for kind in ("limits", "reservations"):
            assert {"cpus", "memory"} <= resources[kind].keys(), (name, kind)


def test_networks_and_published_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert compose["networks"]["backend"]["internal"] is True
    publishing = {name for name, svc in services.items() if svc.get("ports")}
    assert publishing == {"deepseek-app", "grafana", "gateway"}
    for name in ("mysql", "redis", "mysqld-exporter", "redis-exporter", "node-exporter"):
        assert services[name]["networks"] == ["backend"], name
    # Prometheus: the backend, and the internal network where it reaches the engine replicas only
    assert services["prometheus"]["networks"] == ["backend", "metrics"]
    assert compose["networks"]["metrics"]["internal"] is True
    on_metrics = {name for name, svc in services.items() if "metrics" in svc.get("networks", [])}
    assert on_metrics == {"prometheus", "engine"}
    assert set(services["deepseek-app"]["networks"]) == {"frontend", "backend"}


def test_writable_paths_are_volumes_or_tmpfs(compose: dict[str, Any]) -> None:
    services = compose["services"]
    named = set(compose["volumes"])
    for name, svc in services.items():
        for spec in svc.get("volumes", []):
            source = spec.split(":")[0]
            if source.startswith(("./", "/")):
                assert spec.endswith((":ro", ":ro,rslave")), (name, spec)  # host files are read-only
                if source.startswith("./"):
                    assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in named, (name, source)
    app_mounts = {v.split(":")[1] for v in services["deepseek-app"]["volumes"]}
    assert app_mounts == {"/data", "/models"}
    assert any(t.startswith("/tmp:") for t in services["deepseek-app"]["tmpfs"])
    init_sql = "./deploy/mysql/init.sql:/docker-entrypoint-initdb.d/10-init.sql:ro"
    assert init_sql in services["mysql"]["volumes"]


def test_healthchecks_gate_startup(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services, (name, dep)
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no healthcheck"
    app_deps = services["deepseek-app"]["depends_on"]
    assert app_deps == {"mysql": {"condition": "service_healthy"}, "redis": {"condition": "service_healthy"}}
    for name in CORE | {"prometheus", "alertmanager", "grafana"}:
        assert "healthcheck" in services[name], name
    # the app's healthcheck is the image's own script, probing /health/ready
    test = services["deepseek-app"]["healthcheck"]["test"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert test[-1] in dockerfile and test[-1].endswith("healthcheck.py")
    assert "/health/ready" in (ROOT / "deploy" / "docker" / "healthcheck.py").read_text()


def test_secrets_are_required_and_never_literal() -> None:
    text = (ROOT / "compose.yaml").read_text()
    refs = {(m.group(1), m.group(2)) for m in VAR.finditer(text)}
    for secret in SECRETS:
        forms = {op for var, op in refs if var == secret}
        assert forms == {":?"}, f"{secret} must always be ${{{secret}:?...}}, found {forms}"
    assert not re.search(r"(?i)(password|secret|token|key)\w*:\s*['\"]?[A-Za-z0-9]{8,}['\"]?\s*$", text, re.M)


def test_app_environment_defaults_match_settings(compose: dict[str, Any]) -> None:
    env = compose["services"]["deepseek-app"]["environment"]
    fields = Settings.model_fields
    checked = 0
    for key, value in env.items():
        if not key.startswith("DS_"):
            continue
        field = key[3:].lower()
        assert field in fields, f"{key} is not a setting"
        m = VAR.fullmatch(str(value))
        if m and m.group(1) == key and m.group(2) == ":-":
            info = fields[field]
            default = info.default_factory() if info.default_factory is not None else info.default  # type: ignore[call-arg]
            expected = json.dumps(default) if isinstance(default, list) else str(default)
            if isinstance(default, bool):
                expected = expected.lower()
            assert m.group(3) == expected, f"{key}: compose default {m.group(3)!r}, Settings {expected!r}"
            checked += 1
    assert checked >= 10


def test_every_compose_variable_is_documented() -> None:
    example = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", example, re.M))
    used = set()
    for name in ("compose.yaml", "deploy/compose.gpu.yaml"):
        used |= {m.group(1) for m in VAR.finditer((ROOT / name).read_text())}
    assert used - documented == set()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_redis_config_is_accepted_by_redis(tmp_path: Path) -> None:
    conf = tmp_path / "redis.conf"
    conf.write_text((ROOT / "deploy/redis/redis.conf").read_text().replace("dir /data", f"dir {tmp_path}"))
    sock = str(tmp_path / "r.sock")
    # port 0: no TCP listener; the socket in tmp_path only
    proc = subprocess.Popen(
        ["redis-server", str(conf), "--port", "0", "--unixsocket", sock],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def config_get(name: str) -> list[str]:
        return subprocess.run(
            ["redis-cli", "-s", sock, "config", "get", name], capture_output=True, text=True, timeout=5
        ).stdout.split()

    try:
        for _ in range(100):
            if Path(sock).exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert config_get("maxmemory-policy") == ["maxmemory-policy", "volatile-lru"]
        assert config_get("appendonly") == ["appendonly", "yes"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.skipif(shutil.which("mysql") is None, reason="needs the MariaDB client")
def test_exporter_user_script_grants_only_what_the_exporter_reads() -> None:
    """deploy/compose/mysql-exporter-user.sh against the real MariaDB, as the mysql image's entrypoint
    runs it (root over the local socket), with a user name of our own."""
    user, password = f"ds_exp_{secrets.token_hex(4)}", secrets.token_hex(16)
    env = {**os.environ, "MYSQL_ROOT_PASSWORD": "", "MYSQL_EXPORTER_USER": user, "MYSQL_EXPORTER_PASSWORD": password}

    def as_exporter(sql: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["mysql", "-h", "127.0.0.1", "-u", user, "-N", "-B", "-e", sql],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "MYSQL_PWD": password},
        )

    script = ROOT / "deploy/compose/mysql-exporter-user.sh"
    try:
        res = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=30)
        if res.returncode != 0 and "socket" in res.stderr.lower():
            pytest.skip(f"no local MariaDB socket: {res.stderr.strip()}")
        assert res.returncode == 0, res.stderr
        # idempotent: the entrypoint runs it once, a rerun by hand must not fail
        assert subprocess.run(["sh", str(script)], env=env, capture_output=True, timeout=30).returncode == 0
        assert as_exporter("SHOW GLOBAL STATUS LIKE 'Uptime'").stdout.startswith("Uptime")
        assert as_exporter("SELECT COUNT(*) FROM performance_schema.global_status").returncode == 0
        assert as_exporter("SHOW PROCESSLIST").returncode == 0
        denied = as_exporter("SELECT COUNT(*) FROM mysql.user")
        assert denied.returncode != 0 and "denied" in denied.stderr
    finally:
        subprocess.run(
            ["mysql", "-h", "127.0.0.1", "-u", "root", "-e", f"DROP USER IF EXISTS '{user}'@'%'"],
            capture_output=True,
            timeout=30,
        )
