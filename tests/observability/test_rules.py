"""deploy/monitoring checked by the real tools: promtool (Debian `prometheus`) and amtool (Debian
`prometheus-alertmanager`). Skipped only where those packages are absent."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import yaml

from tests.support.monitoring import MONITORING, require_tool

RULE_FILES = sorted((MONITORING / "rules").glob("*.yml"))
RULE_TESTS = sorted((MONITORING / "tests").glob("*_test.yml"))


def run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, env=env, cwd=MONITORING)


def all_alerts() -> set[str]:
    names = set()
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            names.update(rule["alert"] for rule in group["rules"] if "alert" in rule)
    return names


def test_prometheus_config_is_valid() -> None:
    promtool = require_tool("promtool")
    result = run(promtool, "check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout + result.stderr


def test_prometheus_config_scrapes_the_app_and_every_exporter() -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert {"deepseek-serve", "mysqld", "redis", "node", "alertmanager"} <= jobs
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]


def test_rules_are_valid() -> None:
    promtool = require_tool("promtool")
    result = run(promtool, "check", "rules", *RULE_FILES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass() -> None:
    promtool = require_tool("promtool")
    result = run(promtool, "test", "rules", *RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = all_alerts()
    assert len(alerts) >= 15
    assert alerts - fired == set(), "alerts without a firing test"
    assert alerts - quiet == set(), "alerts without a quiet test"


def test_every_alert_has_a_runbook_section_in_operations_doc() -> None:
    doc = (MONITORING.parents[1] / "docs" / "operations.md").read_text()
    headings = {re.sub(r"[^a-z0-9]", "", line.lower()) for line in doc.splitlines() if line.startswith("#")}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                anchor = rule["annotations"]["runbook"].split("#", 1)[1]
                assert anchor == rule["alert"].lower()
                assert anchor in headings, f"docs/operations.md has no section for {rule['alert']}"


def render_alertmanager(tmp_path: Path, **env: str) -> Path:
    out = tmp_path / "alertmanager.yml"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ALERT_")}
    result = run(
        "sh", MONITORING / "render-alertmanager.sh", MONITORING / "alertmanager.yml", out, env={**clean, **env}
    )
    assert result.returncode == 0, result.stderr
    return out


def test_alertmanager_without_receivers_configured_is_valid(tmp_path: Path) -> None:
    amtool = require_tool("amtool")
    out = render_alertmanager(tmp_path)
    result = run(amtool, "check-config", out)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(out.read_text())
    assert all(set(r) == {"name"} for r in config["receivers"])  # UI only, no integrations


def test_alertmanager_receivers_come_from_the_environment(tmp_path: Path) -> None:
    amtool = require_tool("amtool")
    out = render_alertmanager(
        tmp_path,
        ALERT_WEBHOOK_URL="https://hooks.example.com/alerts?token=a&b=c",
        ALERT_EMAIL_TO="oncall@example.com",
        ALERT_EMAIL_FROM="alertmanager@example.com",
        ALERT_SMTP_SMARTHOST="smtp.example.com:587",
        ALERT_SMTP_USERNAME="am",
        ALERT_SMTP_PASSWORD='pa"ss\\word',
    )
    result = run(amtool, "check-config", out)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(out.read_text())
    assert config["global"]["smtp_auth_password"] == 'pa"ss\\word'
    receivers = {r["name"]: r for r in config["receivers"]}
    assert receivers["ops"]["webhook_configs"][0]["url"] == "https://hooks.example.com/alerts?token=a&b=c"
    assert receivers["ops-critical"]["email_configs"][0]["to"] == "oncall@example.com"
    assert "email_configs" not in receivers["ops"]
    # routing: critical alerts reach the email receiver, warnings the webhook only
    critical = run(
        amtool, "config", "routes", "test", f"--config.file={out}", "severity=critical", "alertname=DeepseekServeDown"
    )
    warning = run(
        amtool, "config", "routes", "test", f"--config.file={out}", "severity=warning", "alertname=HostMemoryLow"
    )
    assert critical.stdout.strip() == "ops-critical"
    assert warning.stdout.strip() == "ops"


def test_alertmanager_inhibitions_name_real_alerts() -> None:
    text = (MONITORING / "alertmanager.yml").read_text()
    config = yaml.safe_load(text)
    alerts = all_alerts()
    for rule in config["inhibit_rules"]:
        for matcher in rule.get("source_matchers", []) + rule.get("target_matchers", []):
            m = re.fullmatch(r'alertname(=~|=)"(.+)"', matcher)
            if m is None:
                continue
            pattern = m.group(2) if m.group(1) == "=~" else re.escape(m.group(2))
            assert any(re.fullmatch(pattern, a) for a in alerts), f"{matcher} matches no alert"
