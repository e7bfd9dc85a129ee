"""Settings: DS_ environment, .env files, clear errors, and .env.example documenting every field."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deepseek_serve.config import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[1]


def test_env_prefix_and_types(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("DS_CORS_ORIGINS", '["https://a.example"]')
    s = load_settings(_env_file=None)
    assert s.max_batch_size == 4 and s.cors_origins == ["https://a.example"]


def test_dotenv_file(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("DS_PORT=9001\nDS_LOG_FORMAT=json\n")
    s = load_settings(_env_file=env)
    assert s.port == 9001 and s.log_format == "json"


@pytest.mark.parametrize(
    ("name", "value"),
    [("DS_PORT", "70000"), ("DS_RUNNER", "gpu"), ("DS_MAX_BATCH_SIZE", "zero"), ("DS_ADMIN_KEY", "secret")],
)
def test_invalid_values_name_the_setting(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        load_settings(_env_file=None)
    assert name in str(info.value)


def test_invalid_setting_fails_the_cli_at_start() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "deepseek_serve", "generate", "hi"],
        env={"DS_CONTEXT_LENGTH": "-5", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "DS_CONTEXT_LENGTH" in proc.stderr and "Traceback" not in proc.stderr


def test_derived_values(tmp_path: Path) -> None:
    s = load_settings(_env_file=None, data_dir=tmp_path)
    assert s.effective_database_url == f"sqlite+aiosqlite:///{tmp_path / 'deepseek.db'}"
    assert s.effective_auto_migrate and not s.auth_enabled  # loopback default
    assert load_settings(_env_file=None, host="0.0.0.0").auth_enabled
    assert not load_settings(_env_file=None, host="0.0.0.0", auth="off").auth_enabled


def test_env_example_documents_every_setting() -> None:
    text = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^#?\s*(DS_[A-Z0-9_]+)=", text, flags=re.M))
    expected = {f"DS_{name.upper()}" for name in Settings.model_fields}
    assert expected - documented == set(), f"undocumented: {sorted(expected - documented)}"
    assert documented - expected == set(), f"documented but unknown: {sorted(documented - expected)}"


def test_usable_cpus_follow_a_container_cpu_limit(tmp_path: Path) -> None:
    """The cgroup quota caps the CPU count (a container sees the host's CPUs in its affinity mask):
    cgroup v2 `cpu.max`, v1 `cfs_quota_us` / `cfs_period_us`, none set or unreadable = no limit."""
    from deepseek_serve.config import cpu_quota, usable_cpus

    affinity = len(os.sched_getaffinity(0))
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cpu_quota(v2) == 1.5
    assert usable_cpus(v2) == min(affinity, 2)  # a fraction of a CPU still runs a thread
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(v2) is None and usable_cpus(v2) == affinity
    (v2 / "cpu.max").write_text("50000 100000\n")
    assert usable_cpus(v2) == 1
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(v1) == 1.0 and usable_cpus(v1) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(v1) is None
    assert cpu_quota(tmp_path / "none") is None and usable_cpus(tmp_path / "none") == affinity
