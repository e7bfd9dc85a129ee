"""compose.yaml's `scale` profile: a gateway over N engine replicas, consistent with the settings and
with the rules the rest of the stack follows (tests/deploy/test_compose.py checks the hardening,
the schema and the documentation of every variable for all services)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from deepseek_serve.config import load_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return dict(data["services"])


def _env(svc: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in svc["environment"].items()}


def test_gateway_and_engines_are_the_scale_profile(services: dict[str, Any]) -> None:
    gateway, engine = services["gateway"], services["engine"]
    assert gateway["profiles"] == ["scale"] and engine["profiles"] == ["scale"]
    assert gateway["command"][:3] == ["serve", "--role", "gateway"] and _env(gateway)["DS_ROLE"] == "gateway"
    assert engine["command"][:3] == ["serve", "--role", "engine"] and _env(engine)["DS_ROLE"] == "engine"
    assert engine["deploy"]["replicas"] == "${ENGINE_REPLICAS:-2}"
    # the gateway finds every replica by the service name
    assert _env(gateway)["DS_UPSTREAMS"] == "dns+http://engine:8000"
    assert gateway["depends_on"] == {
        "mysql": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
    }


def test_engines_publish_nothing_share_the_secret_and_hold_no_credentials(services: dict[str, Any]) -> None:
    gateway, engine = services["gateway"], services["engine"]
    assert "ports" not in engine
    assert _env(engine)["DS_ENGINE_SECRET"] == _env(gateway)["DS_ENGINE_SECRET"] == "${DS_ENGINE_SECRET:-}"
    assert not {"DS_DATABASE_URL", "DS_REDIS_URL", "DS_ADMIN_KEY"} & set(_env(engine))
    assert "backend" not in engine["networks"]  # no path to MySQL or Redis
    assert "backend" in gateway["networks"] and "frontend" in gateway["networks"]
    # the engines and the gateway read the same model (the gateway: its tokenizer and template)
    for name in ("DS_MODEL", "DS_MODEL_SOURCE", "DS_SERVED_MODEL_NAME", "DS_CONTEXT_LENGTH"):
        assert _env(engine)[name] == _env(gateway)[name], name


def test_prometheus_scrapes_the_gateway_and_every_engine_replica(services: dict[str, Any]) -> None:
    """The app's scrape job also resolves the scale profile's service names (one target per
    replica), on a network Prometheus shares with each of them; the dashboard and the alerts select
    that job, so they cover the gateway and the engines."""
    config = yaml.safe_load((ROOT / "deploy" / "monitoring" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "deepseek-serve"]
    (dns,) = job["dns_sd_configs"]
    assert set(dns["names"]) == {"gateway", "engine"} and dns["type"] == "A" and dns["port"] == 8000
    internal_port = int(_env(services["engine"])["DS_PORT"])
    assert dns["port"] == internal_port == int(_env(services["gateway"])["DS_PORT"])
    prometheus = set(services["prometheus"]["networks"])
    for name in ("gateway", "engine"):
        assert prometheus & set(services[name]["networks"]), name
    role = [r for r in job["relabel_configs"] if r.get("target_label") == "role"]
    assert role and role[0]["source_labels"] == ["__meta_dns_name"]


def test_an_engine_without_the_secret_refuses_to_start_off_loopback(services: dict[str, Any]) -> None:
    from deepseek_serve.config import SettingsError

    with pytest.raises(SettingsError, match="DS_ENGINE_SECRET"):
        load_settings(_env_file=None, role="engine", host="0.0.0.0", engine_secret="")
    assert load_settings(_env_file=None, role="engine", host="0.0.0.0", engine_secret="s3cret").role == "engine"
