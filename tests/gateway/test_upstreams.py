"""DS_UPSTREAMS parsing (URLs and YAML, with reload), and each upstream's breaker and load."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from deepseek_serve.config import SettingsError, load_settings
from deepseek_serve.gateway.http import Client
from deepseek_serve.gateway.upstreams import (
    Upstream,
    UpstreamConfigError,
    UpstreamSource,
    UpstreamSpec,
    auth_headers,
    expand,
    parse_urls,
    parse_yaml,
)


def test_urls_get_host_port_names_and_lose_trailing_slashes() -> None:
    specs = parse_urls(" http://engine-1:8000/ ,https://gpu.example/v , http://10.0.0.7")
    assert [(s.name, s.url) for s in specs] == [
        ("engine-1:8000", "http://engine-1:8000"),
        ("gpu.example:443/v", "https://gpu.example/v"),
        ("10.0.0.7:80", "http://10.0.0.7"),
    ]
    assert all(s.kind == "auto" and s.model is None for s in specs)


@pytest.mark.parametrize(
    "value, message",
    [
        ("ftp://x:1", "is not an http"),
        ("http://a:1?x=1", "query or fragment"),
        ("http://a:1,http://a:1", "appears twice"),
        (" , ", "no upstreams"),
    ],
)
def test_bad_url_lists_are_refused_with_the_reason(value: str, message: str) -> None:
    with pytest.raises(UpstreamConfigError, match=message):
        parse_urls(value)


def test_yaml_fields() -> None:
    specs = parse_yaml(
        """
upstreams:
  - url: http://engine-1:8000
  - url: http://vllm:8000/
    name: gpu
    model: deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
    kind: openai
    capacity: 64
    api_key: sk-upstream
""",
        "f.yaml",
    )
    assert specs == [
        UpstreamSpec(name="engine-1:8000", url="http://engine-1:8000"),
        UpstreamSpec(
            name="gpu",
            url="http://vllm:8000",
            model="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
            kind="openai",
            capacity=64,
            api_key="sk-upstream",
        ),
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("upstreams: {}", "'upstreams' list"),
        ("- url: http://a:1", "'upstreams' list"),
        ("upstreams:\n  - name: x", "upstreams\\[0\\]: 'url'"),
        ("upstreams:\n  - url: http://a:1\n    kind: grpc", "'kind' must be one of"),
        ("upstreams:\n  - url: http://a:1\n    capacity: 0", "'capacity'"),
        ("upstreams:\n  - url: http://a:1\n    capacity: true", "'capacity'"),
        ("upstreams:\n  - url: http://a:1\n    weight: 2", "unknown field"),
        ("upstreams:\n  - url: http://a:1\n    model: ''", "'model' must be a non-empty string"),
        ("upstreams: [", "not valid YAML"),
    ],
)
def test_bad_yaml_is_refused_naming_the_entry(text: str, message: str) -> None:
    with pytest.raises(UpstreamConfigError, match=message):
        parse_yaml(text, "f.yaml")


def test_yaml_file_reloads_on_change_and_keeps_the_last_good_list(tmp_path: Path) -> None:
    path = tmp_path / "upstreams.yaml"
    path.write_text("upstreams:\n  - url: http://a:1\n")
    source = UpstreamSource(str(path))
    assert [s.url for s in source.load()] == ["http://a:1"]
    assert source.poll() is None  # unchanged
    path.write_text("upstreams:\n  - url: http://a:1\n  - url: http://b:2\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert [s.url for s in source.poll() or []] == ["http://a:1", "http://b:2"]
    path.write_text("upstreams: [broken")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2_000_000))
    assert source.poll() is None  # logged, previous list stays
    assert source.poll() is None  # and not re-read until it changes again


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(UpstreamConfigError, match="cannot read"):
        UpstreamSource(str(tmp_path / "nope.yaml")).load()


def test_gateway_role_needs_upstreams_and_engine_role_a_secret_off_loopback() -> None:
    with pytest.raises(SettingsError, match="DS_UPSTREAMS"):
        load_settings(_env_file=None, role="gateway")
    with pytest.raises(SettingsError, match="DS_ENGINE_SECRET"):
        load_settings(_env_file=None, role="engine", host="0.0.0.0")
    assert load_settings(_env_file=None, role="engine").role == "engine"  # loopback: secret optional
    with pytest.raises(SettingsError, match="one engine per process"):
        load_settings(_env_file=None, role="engine", workers=2)
    # several API workers of an engine role share one engine process
    assert load_settings(_env_file=None, role="engine", workers=2, engine_process="on").workers == 2
    with pytest.raises(SettingsError, match="DS_ROLE"):
        load_settings(_env_file=None, role="router")


def test_breaker_opens_after_failures_or_at_once_on_refusal_and_load_counts_inflight() -> None:
    client = Client("http://a:1", connect_timeout_s=1.0)
    up = Upstream(spec=UpstreamSpec(name="a", url="http://a:1"), client=client, ever_healthy=True)
    assert up.available()
    assert not up.failure(hard=False, threshold=3, eject_s=5.0, why="500")
    assert not up.failure(hard=False, threshold=3, eject_s=5.0, why="500")
    up.success()  # a success in between resets the count
    assert not up.failure(hard=False, threshold=3, eject_s=5.0, why="500")
    assert not up.failure(hard=False, threshold=3, eject_s=5.0, why="500")
    assert up.failure(hard=False, threshold=3, eject_s=5.0, why="500")
    assert not up.available() and up.ejections_total == 1
    other = Upstream(spec=UpstreamSpec(name="b", url="http://b:1"), client=client, ever_healthy=True)
    assert other.failure(hard=True, threshold=3, eject_s=5.0, why="refused")
    assert not other.available()
    # load: requests another gateway has there (report minus ours at report time) + ours now
    load = Upstream(
        spec=UpstreamSpec(name="c", url="http://c:1"),
        client=client,
        capacity=4,
        reported_busy=3,
        inflight_at_report=1,
        inflight=2,
    )
    assert load.load() == pytest.approx((3 - 1 + 2) / 4)


async def test_dns_entries_expand_to_one_upstream_per_address() -> None:
    specs = parse_urls("dns+http://localhost:8123/base,http://fixed:1")
    assert specs[0].name == "localhost:8123/base"
    expanded = await expand(specs)
    assert expanded[-1] == specs[1]  # plain URLs pass through
    resolved = {s.url: s.name for s in expanded[:-1]}
    assert resolved.get("http://127.0.0.1:8123/base") == "localhost:8123/base/127.0.0.1"
    assert await expand(parse_urls("dns+http://no-such-host.invalid:1")) == []  # nothing up: no upstream


def test_the_engine_secret_goes_to_our_engines_never_to_other_servers() -> None:
    client = Client("http://a:1", connect_timeout_s=1.0)
    ours = Upstream(spec=UpstreamSpec(name="a", url="http://a:1"), client=client, kind="deepseek")
    unknown = Upstream(spec=UpstreamSpec(name="b", url="http://b:1"), client=client, kind="auto")
    vllm = Upstream(spec=UpstreamSpec(name="c", url="http://c:1"), client=client, kind="openai")
    keyed = Upstream(spec=UpstreamSpec(name="d", url="http://d:1", api_key="sk-own"), client=client, kind="openai")
    assert auth_headers(ours, "s3cret") == auth_headers(unknown, "s3cret") == {"Authorization": "Bearer s3cret"}
    assert auth_headers(vllm, "s3cret") == {}
    assert auth_headers(keyed, "s3cret") == {"Authorization": "Bearer sk-own"}
