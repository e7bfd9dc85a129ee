"""Helpers for the monitoring tests: a real app server process, a real Prometheus, PromQL name parsing."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.net import free_port
from tests.support.server import ServeProcess, ServerProcess

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deploy" / "monitoring"
APT_HINT = "apt-get install -y prometheus prometheus-alertmanager"


def require_tool(name: str) -> str:
    """Path of a Debian monitoring binary; skips the test (saying which package) when it is absent."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed ({APT_HINT})")
    return path


# --- the app, run by `deepseek-serve serve` ----------------------------------------------------------------
class AppServer(ServeProcess):
    """The real server for the monitoring tests, with Redis and the response cache off."""

    def __init__(self, data_dir: Path, workers: int = 1, **env: str) -> None:
        super().__init__(
            data_dir, args=("--workers", str(workers)), **{"DS_REDIS_URL": "", "DS_RESPONSE_CACHE": "false", **env}
        )


# --- a real Prometheus --------------------------------------------------------------------------------
class PrometheusServer(ServerProcess):
    """Debian's `prometheus` on a free port with a tmp storage folder and the given configuration."""

    def __init__(self, workdir: Path, config: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        config_path = workdir / "prometheus.yml"
        config_path.write_text(config)
        command = [
            require_tool("prometheus"),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        super().__init__(command, ready_url=f"{self.url}/-/ready", log_path=workdir / "prometheus.log", timeout_s=60)

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


# --- metric names in PromQL -----------------------------------------------------------------------------
_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "inf",
        "nan",
    }
)
# metric names Prometheus makes itself
BUILTIN_METRICS = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds", "scrape_samples_scraped"})


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels and numbers removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery windows
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()", text):
        name = match.group(1)
        if name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def sample_names(family: str, kind: str) -> set[str]:
    """The sample names a family of `kind` exposes."""
    if kind in ("histogram", "summary"):
        return {family, f"{family}_bucket", f"{family}_sum", f"{family}_count"}
    return {family}


def exporter_metric_names() -> dict[str, str]:
    """{sample name: exporter} from deploy/monitoring/exporter-metrics.txt."""
    out: dict[str, str] = {}
    for line in (MONITORING / "exporter-metrics.txt").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        exporter, family, kind = line.split()
        for name in sample_names(family, kind):
            out[name] = exporter
    return out
