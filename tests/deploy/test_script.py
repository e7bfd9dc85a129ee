"""deploy/deploy.sh: host checks, dry runs, idempotency, .env generation, failure reporting.

The script runs for real on a copy of the project in a temporary directory, with DEPLOY_ROOT
pointing /etc/os-release, /proc/meminfo, /etc/systemd/system and /var/log into that directory.
The commands docker, ufw, systemctl, apt-get, curl and hostname are stand-ins on PATH that record their
calls: this machine has no Docker engine, no systemd and no firewall to change, and the script must
never touch the real host's. The stand-in ufw keeps its rules in a file so a second run sees the first.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from deepseek_serve.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
REQUIRED_SECRETS = (
    "MYSQL_ROOT_PASSWORD",
    "MYSQL_PASSWORD",
    "MYSQL_EXPORTER_PASSWORD",
    "REDIS_PASSWORD",
    "GRAFANA_ADMIN_PASSWORD",
    "DS_ADMIN_KEY",
)

STUBS = {
    "docker": """#!/bin/bash
echo "docker $*" >>"$STUB_LOG"
if [[ "$1 $2" == "compose version" ]]; then
    [[ -n "${DOCKER_MISSING:-}" ]] && exit 1
    echo "Docker Compose version v2.29.7"; exit 0
fi
[[ -n "${DOCKER_FAIL_BUILD:-}" && " $* " == *" build"* ]] && { echo "build failed" >&2; exit 17; }
exit 0
""",
    "ufw": """#!/bin/bash
echo "ufw $*" >>"$STUB_LOG"
state="$STUB_STATE/ufw"; touch "$state" "$state.active"
case "$1" in
  status) if [[ -s "$state.active" ]]; then echo "Status: active"; else echo "Status: inactive"; fi
          echo; echo "To  Action  From"; sed 's/$/                   ALLOW       Anywhere/' "$state" ;;
  allow) grep -qx "$2" "$state" || echo "$2" >>"$state"; echo "Rule added" ;;
  --force) echo on >"$state.active" ;;
esac
exit 0
""",
    "systemctl": '#!/bin/bash\necho "systemctl $*" >>"$STUB_LOG"\n',
    "apt-get": '#!/bin/bash\necho "apt-get $*" >>"$STUB_LOG"\n',
    "curl": '#!/bin/bash\necho "curl $*" >>"$STUB_LOG"\n[[ -n "${NEVER_READY:-}" ]] && exit 7\nexit 0\n',
    "hostname": "#!/bin/bash\necho 203.0.113.7\n",
}


@dataclass
class Host:
    """A fake host: DEPLOY_ROOT, the project copy to deploy, and the stand-ins' call log."""

    root: Path
    app: Path
    stubs: Path
    log: Path

    def write_os(self, os_id: str, version: str, codename: str = "jammy") -> None:
        (self.root / "etc" / "os-release").write_text(
            f'NAME="{os_id.title()}"\nID={os_id}\nVERSION_ID="{version}"\nVERSION_CODENAME={codename}\n'
        )

    def write_mem_gib(self, gib: float) -> None:
        meminfo = f"MemTotal:       {int(gib * 1024 * 1024)} kB\nMemFree: 1 kB\n"
        (self.root / "proc" / "meminfo").write_text(meminfo)

    def deploy(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        full_env = {
            "PATH": f"{self.stubs}:{os.environ['PATH']}",
            "HOME": str(self.root),
            "TMPDIR": str(self.root / "tmp"),
            "DEPLOY_ROOT": str(self.root),
            "DEPLOY_NPROC": "8",
            "DEPLOY_DISK_FREE_GB": "200",
            "STUB_LOG": str(self.log),
            "STUB_STATE": str(self.root),
            **env,
        }
        return subprocess.run(
            ["bash", str(self.app / "deploy" / "deploy.sh"), "--timeout", "5", *args],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=60,
        )

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture
def host(tmp_path: Path) -> Host:
    root = tmp_path / "root"
    for d in ("etc", "proc", "tmp"):
        (root / d).mkdir(parents=True)
    app = tmp_path / "srv" / "deepseek-serve"
    app.mkdir(parents=True)
    shutil.copy(ROOT / "compose.yaml", app / "compose.yaml")
    shutil.copytree(ROOT / "deploy", app / "deploy", ignore=shutil.ignore_patterns("__pycache__"))
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, body in STUBS.items():
        path = stubs / name
        path.write_text(body)
        path.chmod(0o755)
    h = Host(root=root, app=app, stubs=stubs, log=tmp_path / "calls.log")
    h.write_os("ubuntu", "22.04")
    h.write_mem_gib(16)
    return h


def _env_map(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def _snapshot(h: Host) -> dict[str, tuple[bytes, int]]:
    files = [h.app / ".env", *sorted((h.root / "etc" / "systemd" / "system").glob("*"))]
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


@pytest.mark.parametrize("version", ["20.04", "22.04", "24.04"])
def test_fresh_host_then_second_run_changes_nothing(host: Host, version: str) -> None:
    host.write_os("ubuntu", version)
    first = host.deploy()
    assert first.returncode == 0, first.stderr

    env_file = host.app / ".env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    env = _env_map(env_file)
    for key in REQUIRED_SECRETS:
        assert len(env[key]) >= 32, key
    assert len({env[k] for k in REQUIRED_SECRETS}) == len(REQUIRED_SECRETS)
    assert re.fullmatch(r"sk-[0-9a-f]{48}", env["DS_ADMIN_KEY"])
    assert load_settings(admin_key=env["DS_ADMIN_KEY"]).admin_key == env["DS_ADMIN_KEY"]

    unit = (host.root / "etc/systemd/system/deepseek-serve.service").read_text()
    assert f"WorkingDirectory={host.app}\n" in unit and "@" not in unit
    assert (host.root / "etc/systemd/system/deepseek-serve-backup.timer").exists()
    calls = host.calls()
    assert "ufw allow 22/tcp" in calls and "ufw allow 8000/tcp" in calls and "ufw --force enable" in calls
    assert any(c.endswith(" build") and c.startswith("docker compose") for c in calls)
    assert any(" up -d" in c for c in calls)
    assert "systemctl enable deepseek-serve.service" in calls
    assert not any(c.startswith("apt-get") for c in calls)  # Docker present: nothing installed
    assert env["DS_ADMIN_KEY"] in first.stdout and "http://203.0.113.7:8000/v1" in first.stdout
    logs = list((host.root / "var/log/deepseek-serve").glob("deploy-*.log"))
    assert len(logs) == 1
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \[CHANGE\]", logs[0].read_text(), re.M)

    before = _snapshot(host)
    host.log.unlink()
    second = host.deploy()
    assert second.returncode == 0, second.stderr
    assert _snapshot(host) == before
    assert "changes made:            0" in second.stdout
    assert "[CHANGE]" not in second.stderr
    calls = host.calls()
    assert not any(c.startswith(("ufw allow", "ufw --force", "apt-get", "systemctl")) for c in calls), calls


def test_existing_env_is_kept_and_only_missing_secrets_added(host: Host) -> None:
    env_file = host.app / ".env"
    env_file.write_text("APP_PORT=9000\nMYSQL_ROOT_PASSWORD=mine\nMYSQL_PASSWORD=mine2\nREDIS_PASSWORD=\n")
    res = host.deploy("--no-firewall", "--no-backup-timer")
    assert res.returncode == 0, res.stderr
    text = env_file.read_text()
    assert text.startswith("APP_PORT=9000\nMYSQL_ROOT_PASSWORD=mine\nMYSQL_PASSWORD=mine2\nREDIS_PASSWORD=\n")
    env = _env_map(env_file)
    assert env["MYSQL_ROOT_PASSWORD"] == "mine" and len(env["REDIS_PASSWORD"]) == 48  # empty: refilled
    assert set(REQUIRED_SECRETS) <= env.keys()
    assert "http://203.0.113.7:9000/v1" in res.stdout
    assert not any(c.startswith("ufw") for c in host.calls())
    assert not (host.root / "etc/systemd/system/deepseek-serve-backup.timer").exists()
    again = env_file.read_bytes()
    assert host.deploy("--no-firewall", "--no-backup-timer").returncode == 0
    assert env_file.read_bytes() == again


def test_dry_run_plans_everything_and_changes_nothing(host: Host) -> None:
    res = host.deploy("--dry-run", "--monitoring", DOCKER_MISSING="1")
    assert res.returncode == 0, res.stderr
    plan = res.stderr
    assert "would run: apt-get install -y docker-ce docker-ce-cli containerd.io" in plan
    assert "would: write" in plan and ".env with new random secrets" in plan
    assert "would: ufw allow 3000/tcp" in plan and "would: enable ufw" in plan
    assert "would: install" in plan and "deepseek-serve.service" in plan
    assert "would run: docker compose --profile monitoring build" in plan
    assert re.search(r"dry run: \d+ change\(s\) would be made; nothing was changed", plan)
    assert not (host.app / ".env").exists()
    assert not (host.root / "etc" / "systemd").exists() and not (host.root / "var").exists()
    mutating = [c for c in host.calls() if not c.startswith(("docker compose version", "ufw status"))]
    assert mutating == []


def test_dry_run_after_a_deploy_plans_no_change(host: Host) -> None:
    assert host.deploy().returncode == 0
    res = host.deploy("--dry-run")
    assert res.returncode == 0, res.stderr
    assert "dry run: 0 change(s) would be made" in res.stderr


@pytest.mark.parametrize(
    ("os_id", "version", "message"),
    [
        ("debian", "12", "unsupported OS 'debian 12'"),
        ("ubuntu", "18.04", "unsupported OS 'ubuntu 18.04'"),
        ("ubuntu", "23.10", "unsupported OS 'ubuntu 23.10'"),
        ("centos", "7", "unsupported OS"),
    ],
)
def test_unsupported_os_is_refused(host: Host, os_id: str, version: str, message: str) -> None:
    host.write_os(os_id, version)
    for mode in ((), ("--dry-run",)):
        res = host.deploy(*mode)
        assert res.returncode == 2 and message in res.stderr, res.stderr
    assert not (host.app / ".env").exists() and host.calls() == []


def test_missing_os_release_is_refused(host: Host) -> None:
    (host.root / "etc" / "os-release").unlink()
    res = host.deploy("--dry-run")
    assert res.returncode == 2 and "unsupported system" in res.stderr


@pytest.mark.parametrize(
    ("mem_gib", "env", "message"),
    [
        (2, {}, "RAM: at least 4 GiB"),
        (16, {"DEPLOY_DISK_FREE_GB": "5"}, "5 GB free"),
        (16, {"DEPLOY_NPROC": "1"}, "1 CPU(s): at least 2"),
    ],
)
def test_small_hosts_are_refused(host: Host, mem_gib: float, env: dict[str, str], message: str) -> None:
    host.write_mem_gib(mem_gib)
    res = host.deploy("--dry-run", **env)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert not (host.app / ".env").exists()


def test_recommended_minimums_warn_but_proceed(host: Host) -> None:
    host.write_mem_gib(6)
    res = host.deploy("--dry-run", DEPLOY_NPROC="2", DEPLOY_DISK_FREE_GB="40")
    assert res.returncode == 0, res.stderr
    for warning in ("[WARN] 2 CPUs", "[WARN] 6144 MiB RAM", "[WARN] 40 GB free"):
        assert warning in res.stderr


def test_failures_name_the_line_and_readiness_times_out(host: Host) -> None:
    res = host.deploy(DOCKER_FAIL_BUILD="1")
    assert res.returncode == 17
    m = re.search(r"deploy\.sh: line (\d+): 'compose build' exited with status 17", res.stderr)
    assert m, res.stderr
    line = (host.app / "deploy" / "deploy.sh").read_text().splitlines()[int(m.group(1)) - 1]
    assert "run compose" in line and "build" in line

    res = host.deploy(NEVER_READY="1")
    assert res.returncode == 1
    assert "not ready after 5s" in res.stderr
    assert any("logs --tail 50 deepseek-app" in c for c in host.calls())


def test_help_and_bad_arguments(host: Host) -> None:
    res = host.deploy("--help")
    assert res.returncode == 0 and "--dry-run" in res.stdout and "--no-firewall" in res.stdout
    res = host.deploy("--frobnicate")
    assert res.returncode == 2 and "unknown argument: --frobnicate" in res.stderr
    res = host.deploy("--app-port", "70000")
    assert res.returncode == 2 and "--app-port must be 1-65535" in res.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="needs shellcheck (apt install shellcheck)")
def test_shell_scripts_are_shellcheck_clean() -> None:
    scripts = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "deploy").rglob("*.sh")
        if "monitoring" not in p.parts and "mysql" not in p.parts
    )
    assert {"deploy/deploy.sh", "deploy/backup.sh", "deploy/restore.sh"} <= set(scripts)
    res = subprocess.run(["shellcheck", "-x", *scripts], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_repo_is_cloned_then_fast_forwarded(host: Host, tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    shutil.copytree(host.app, origin)

    def git(*args: str, cwd: Path = origin) -> str:
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
            cwd=cwd,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    git("init", "-q", "-b", "main")
    git("add", "-A")
    git("commit", "-q", "-m", "v1")
    target = host.root / "opt" / "deepseek-serve"
    args = ("--repo", f"file://{origin}", "--ref", "main", "--no-firewall")

    plan = host.deploy("--dry-run", *args)
    assert plan.returncode == 0, plan.stderr
    assert "would: clone" in plan.stderr and not target.exists()

    first = host.deploy(*args)
    assert first.returncode == 0, first.stderr
    assert git("rev-parse", "HEAD", cwd=target) == git("rev-parse", "HEAD")
    assert (target / ".env").exists() and not (host.app / ".env").exists()
    unit = (host.root / "etc/systemd/system/deepseek-serve.service").read_text()
    assert f"WorkingDirectory={target}\n" in unit

    second = host.deploy(*args)
    assert second.returncode == 0 and "changes made:            0" in second.stdout, second.stderr

    (origin / "CHANGELOG").write_text("v2\n")
    git("add", "CHANGELOG")
    git("commit", "-q", "-m", "v2")
    third = host.deploy(*args)
    assert third.returncode == 0, third.stderr
    assert git("rev-parse", "HEAD", cwd=target) == git("rev-parse", "HEAD")
    assert (target / "CHANGELOG").exists() and "[CHANGE] code updated" in third.stderr
    assert "changes made:            1" in third.stdout
