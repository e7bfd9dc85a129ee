"""A scaled-out deployment in real processes: two gateways (`serve --role gateway`) over two of our
engines (`serve --role engine`, SmolLM2, small context) and one llama.cpp `llama-server`, sharing
MariaDB and Redis, driven by the official `openai` client.

Checked: the engine's shared secret and its load report (with its prefix-cache summary); traffic
reaches every upstream; limits and usage are exact across both gateways; a conversation keeps
hitting one upstream whichever gateway its turns go through; a prompt extending what an engine
holds goes to that engine through a gateway that never saw it; `kill -9` of an engine under load
fails no request that had not started, ejects it within 5 s, and readmits it when it is back.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import APIError, OpenAI, RateLimitError

from deepseek_serve.engine import prefix_summary
from deepseek_serve.models.resolve import default_model_path
from deepseek_serve.storage.keys import generate_secret
from tests.support.cache import delete_prefix, redis_url, unique_prefix
from tests.support.net import free_port
from tests.support.server import REPO, ServeProcess, ServerProcess
from tests.support.storage import create_database, mariadb, mariadb_exec

# the first test's setup may build llama-server (minutes, once; .ci/run builds it beforehand).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SECRET = "engine-secret-" + uuid.uuid4().hex
ENGINE_ENV = {
    "DS_ENGINE_SECRET": SECRET,
    "DS_LOG_LEVEL": "warning",
    "DS_MAX_BATCH_SIZE": "4",
    "DS_CONTEXT_LENGTH": "1024",
    "DS_N_THREADS": "1",
}
LLAMA_MODEL_NAME = "smollm2-on-llama-server"


def _llama_server_binary() -> str:
    """bench/build_llama_server.sh: the cached binary, or a build of a few minutes the first time."""
    done = subprocess.run(
        ["bash", str(REPO / "bench" / "build_llama_server.sh")], capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


class LlamaServer(ServerProcess):
    """llama.cpp's `llama-server` on a free port with the test model; started on construction."""

    def __init__(self, binary: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [binary, "-m", str(default_model_path()), "--host", "127.0.0.1", "--port", str(self.port)]
        options = ["-c", "2048", "-np", "2", "-t", "1", "--alias", LLAMA_MODEL_NAME]
        super().__init__([*command, *options], ready_url=f"{self.url}/health", log_path=log, stdout=False)
        self.start()


def _engine(data_dir: Path, port: int | None = None) -> ServeProcess:
    return ServeProcess(data_dir, args=("--role", "engine"), port=port, **ENGINE_ENV).__enter__()


@dataclass
class Cluster:
    engines: dict[str, ServeProcess]
    llama: LlamaServer
    gateways: list[ServeProcess]
    admin_key: str
    tmp: Path

    def upstreams(self, gateway: int = 0) -> dict[str, dict[str, Any]]:
        response = httpx.get(
            f"{self.gateways[gateway].url}/admin/upstreams",
            headers={"Authorization": f"Bearer {self.admin_key}"},
            timeout=10,
        )
        response.raise_for_status()
        return {u["name"]: u for u in response.json()["data"]}

    def served(self, gateway: int = 0) -> dict[str, int]:
        return {name: u["served_total"] for name, u in self.upstreams(gateway).items()}

    def served_by_both(self) -> dict[str, int]:
        a, b = self.served(0), self.served(1)
        return {name: a.get(name, 0) + b.get(name, 0) for name in a.keys() | b.keys()}

    def client(self, gateway: int = 0, key: str | None = None) -> OpenAI:
        return OpenAI(
            base_url=f"{self.gateways[gateway].url}/v1", api_key=key or self.admin_key, max_retries=0, timeout=120
        )

    def create_key(self, **fields: Any) -> tuple[str, str]:
        response = httpx.post(
            f"{self.gateways[0].url}/admin/keys",
            json={"name": "pool", **fields},
            headers={"Authorization": f"Bearer {self.admin_key}"},
            timeout=10,
        )
        response.raise_for_status()
        body = response.json()
        return str(body["id"]), str(body["key"])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("pool")
    redis = redis_url()
    database = asyncio.run(create_database("ds_test_gateway"))
    prefix = unique_prefix()
    binary = _llama_server_binary()
    started: list[Any] = []
    try:
        engines = {}
        for name in ("engine-a", "engine-b"):
            engines[name] = _engine(tmp / name)
            started.append(engines[name])
        llama = LlamaServer(binary, tmp / "llama-server.log")
        upstreams = tmp / "upstreams.yaml"
        upstreams.write_text(
            "upstreams:\n"
            f"  - {{name: engine-a, url: '{engines['engine-a'].url}', kind: deepseek}}\n"
            f"  - {{name: engine-b, url: '{engines['engine-b'].url}', kind: deepseek}}\n"
            f"  - {{name: llama, url: '{llama.url}', kind: openai, capacity: 2, model: {LLAMA_MODEL_NAME}}}\n"
        )
        admin_key = generate_secret()
        gateway_env = {
            "DS_UPSTREAMS": str(upstreams),
            "DS_ENGINE_SECRET": SECRET,
            "DS_LOG_LEVEL": "warning",
            "DS_DATABASE_URL": mariadb().url(database),
            "DS_DB_AUTO_MIGRATE": "true",
            "DS_REDIS_URL": redis,
            "DS_REDIS_KEY_PREFIX": prefix,
            "DS_AUTH": "on",
            "DS_ADMIN_KEY": admin_key,
            "DS_USAGE_FLUSH_INTERVAL_S": "0.2",
            "DS_RESPONSE_CACHE": "false",
            "DS_CONTEXT_LENGTH": "1024",
            "DS_GATEWAY_HEALTH_INTERVAL_S": "0.5",
            "DS_GATEWAY_HEADER_TIMEOUT_S": "2",
            "DS_GATEWAY_EJECT_S": "2",
        }
        gateways = []
        for i in range(2):  # one after the other: the first migrates the schema
            gateway = ServeProcess(tmp / f"gateway-{i}", args=("--role", "gateway"), **gateway_env).__enter__()
            started.append(gateway)
            gateways.append(gateway)
        cluster = Cluster(engines, llama, gateways, admin_key, tmp)
        yield cluster
    finally:
        if "cluster" in locals():  # an engine restarted by a test replaced its entry there
            started += [e for e in cluster.engines.values() if e not in started]
        for proc in reversed(started):
            proc.__exit__(None, None, None)
        if "llama" in locals():
            llama.kill()
        delete_prefix(redis, prefix)
        asyncio.run(mariadb_exec(f"DROP DATABASE IF EXISTS `{database}`"))


def _chat(client: OpenAI, text: str, max_tokens: int = 16, **extra: Any) -> Any:
    return client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": text}],
        max_tokens=max_tokens,
        temperature=0,
        **extra,
    )


def test_engine_role_requires_the_shared_secret_and_reports_its_load(cluster: Cluster) -> None:
    engine = cluster.engines["engine-b"]
    body = {"model": "x", "prompt": "Hello", "max_tokens": 2}
    refused = httpx.post(f"{engine.url}/v1/completions", json=body, timeout=30)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_engine_secret"
    wrong = httpx.get(f"{engine.url}/internal/load", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401
    auth = {"Authorization": f"Bearer {SECRET}"}
    report = httpx.get(f"{engine.url}/internal/load", headers=auth, timeout=10).json()
    assert report["ready"] is True and report["max_batch_size"] == 4
    assert {"running", "waiting", "kv_used_tokens", "kv_capacity_tokens", "prefix_cache"} <= report.keys()
    # the prefix-cache summary: the blocks of a prompt the engine has just served are in it
    ids = [1000 + 7 * i for i in range(3 * prefix_summary.BLOCK_TOKENS + 5)]
    model = httpx.get(f"{engine.url}/v1/models", headers=auth, timeout=10).json()["data"][0]["id"]
    done = httpx.post(
        f"{engine.url}/v1/completions",
        json={"model": model, "prompt": ids, "max_tokens": 2, "temperature": 0},
        headers=auth,
        timeout=60,
    )
    assert done.status_code == 200, done.text
    cache = httpx.get(f"{engine.url}/internal/load", headers=auth, timeout=10).json()["prefix_cache"]
    assert cache["scheme"] == prefix_summary.SCHEME
    held = prefix_summary.decode(cache["blocks"])
    assert prefix_summary.matched_blocks(prefix_summary.block_hashes(ids), held) == 3
    # no keys, usage or admin on an engine
    assert httpx.get(f"{engine.url}/admin/keys", headers=auth, timeout=10).status_code == 404
    assert httpx.get(f"{engine.url}/health/ready", timeout=10).status_code == 200  # probes need no secret


def test_the_gateway_renders_a_chat_exactly_as_an_engine_does(cluster: Cluster) -> None:
    engine = cluster.engines["engine-b"]
    messages = [{"role": "user", "content": "Which prompt do you see?"}]
    direct = OpenAI(base_url=f"{engine.url}/v1", api_key=SECRET, max_retries=0, timeout=120)
    model = direct.models.list().data[0].id
    a = direct.chat.completions.create(model=model, messages=messages, max_tokens=1, temperature=0)  # type: ignore[arg-type]
    b = cluster.client().chat.completions.create(model=model, messages=messages, max_tokens=1, temperature=0)  # type: ignore[arg-type]
    assert a.usage is not None and b.usage is not None
    assert b.usage.prompt_tokens == a.usage.prompt_tokens  # same template, default system prompt, tokenizer


def test_requests_reach_every_upstream_json_and_streamed(cluster: Cluster) -> None:
    before = cluster.served()
    client = cluster.client()

    def one(i: int) -> str:
        if i % 2:
            return _chat(client, f"Say something about the number {i}.").choices[0].message.content or ""
        stream = _chat(client, f"Count to {i} please.", stream=True, stream_options={"include_usage": True})
        parts, usage = [], None
        for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                usage = chunk.usage
        assert usage is not None and usage.completion_tokens >= 1
        return "".join(parts)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(12)))
    assert all(answers)
    after = cluster.served()
    gained = {name: after[name] - before[name] for name in after}
    assert sum(gained.values()) == 12
    assert all(n > 0 for n in gained.values()), gained  # both engines and llama-server took work
    exposition = httpx.get(f"{cluster.gateways[0].url}/metrics", timeout=10).text
    for name in after:
        assert f'llm_gateway_upstream_up{{upstream="{name}"}} 1.0' in exposition
        assert f'llm_gateway_upstream_requests_total{{upstream="{name}"}} {float(after[name])}' in exposition


def test_limits_and_usage_are_exact_across_both_gateways(cluster: Cluster) -> None:
    key_id, key = cluster.create_key(rpm_limit=8)
    clients = [cluster.client(0, key), cluster.client(1, key)]
    model = clients[0].models.list().data[0].id  # models.list is not rate limited

    def one(i: int) -> Any:
        try:
            return clients[i % 2].chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"Name a color ({i})."}], max_tokens=6, temperature=0
            )
        except RateLimitError as exc:
            return exc

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    ok = [r for r in results if not isinstance(r, RateLimitError)]
    assert len(ok) == 8, results
    assert all(r.response.status_code == 429 for r in results if isinstance(r, RateLimitError))
    prompt = sum(r.usage.prompt_tokens for r in ok)
    completion = sum(r.usage.completion_tokens for r in ok)
    deadline = time.monotonic() + 20
    while True:
        rows = httpx.get(
            f"{cluster.gateways[1].url}/admin/usage",
            params={"group_by": "key", "key_id": key_id},
            headers={"Authorization": f"Bearer {cluster.admin_key}"},
            timeout=10,
        ).json()["data"]
        got = rows[0] if rows else {}
        if got.get("requests", 0) - got.get("errors", 0) >= 8 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert (got["requests"] - got["errors"], got["prompt_tokens"], got["completion_tokens"]) == (8, prompt, completion)


def test_a_conversation_keeps_hitting_one_upstream(cluster: Cluster) -> None:
    created = httpx.post(
        f"{cluster.gateways[0].url}/v1/conversations",
        json={"title": "sticky"},
        headers={"Authorization": f"Bearer {cluster.admin_key}"},
        timeout=10,
    )
    created.raise_for_status()
    conversation = created.json()["id"]
    hits = []
    for i, turn in enumerate(("Hi, I am Ada.", "What is my name?", "Say it again.", "Thanks!")):
        before = cluster.served_by_both()
        # turns alternate between the gateways: their routing agrees with no shared state
        _chat(cluster.client(i % 2), turn, max_tokens=12, extra_body={"conversation_id": conversation})
        after = cluster.served_by_both()
        hits.append([name for name in after if after[name] > before.get(name, 0)])
    assert all(len(h) == 1 for h in hits), hits
    assert len({h[0] for h in hits}) == 1, hits


def test_a_prompt_goes_to_the_engine_whose_cache_holds_its_prefix(cluster: Cluster) -> None:
    """The history is put into one engine directly, so no gateway has seen it: only the engine's load
    report can tell the gateway where it is. Once per engine (a lucky random pick is 1 in 3 each)."""
    model = cluster.client().models.list().data[0].id
    for name, engine in cluster.engines.items():
        story = " ".join(f"{name} note {i}: the archive keeps map {i * 13} in drawer {i % 7}." for i in range(24))
        history = [{"role": "user", "content": f"Remember these notes. {story}"}]
        direct = OpenAI(base_url=f"{engine.url}/v1", api_key=SECRET, max_retries=0, timeout=120)
        answer = direct.chat.completions.create(model=model, messages=history, max_tokens=8, temperature=0)  # type: ignore[arg-type]
        time.sleep(1.5)  # health rounds every 0.5 s bring the gateway the engine's new report
        assert cluster.upstreams(1)[name]["report"]["prefix_cache"]["blocks_held"] > 0
        follow_up = [
            *history,
            {"role": "assistant", "content": answer.choices[0].message.content or ""},
            {"role": "user", "content": "Which drawer holds map 26?"},
        ]
        before = cluster.served(1)
        cluster.client(1).chat.completions.create(model=model, messages=follow_up, max_tokens=4, temperature=0)  # type: ignore[arg-type]
        after = cluster.served(1)
        assert [n for n in after if after[n] > before[n]] == [name]


def test_a_client_that_goes_away_cancels_the_upstream_request(cluster: Cluster) -> None:
    auth = {"Authorization": f"Bearer {cluster.admin_key}"}
    model = cluster.client().models.list().data[0].id
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me everything."}],
        "max_tokens": 600,
        "ignore_eos": True,
        "stream": True,
    }

    def engines_running() -> int:
        reports = [
            httpx.get(f"{e.url}/internal/load", headers={"Authorization": f"Bearer {SECRET}"}, timeout=10)
            for e in cluster.engines.values()
        ]
        return sum(r.json()["running"] for r in reports)

    def gateway_inflight() -> int:
        return sum(u["inflight"] for u in cluster.upstreams().values())

    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", f"{cluster.gateways[0].url}/v1/chat/completions", json=body, headers=auth) as response,
    ):
        for line in response.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                assert gateway_inflight() == 1  # the first token arrived: the request runs upstream
                break  # leaving the line iterator closes the connection
    deadline = time.monotonic() + 5
    while (gateway_inflight(), engines_running()) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (gateway_inflight(), engines_running()) == (0, 0)


def test_an_edited_upstreams_file_applies_without_a_restart(cluster: Cluster) -> None:
    path = cluster.tmp / "upstreams.yaml"
    original = path.read_text()

    def wait_for(names: set[str]) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            states = [{n: u["state"] for n, u in cluster.upstreams(g).items()} for g in range(2)]
            if all(set(s) == names and set(s.values()) == {"healthy"} for s in states):
                return
            time.sleep(0.1)
        raise AssertionError(f"upstreams never became {names}: {states}")

    try:
        path.write_text("\n".join(line for line in original.splitlines() if "name: llama" not in line) + "\n")
        wait_for({"engine-a", "engine-b"})
        path.write_text("upstreams: [this is not")  # a broken edit is ignored: the last good list stays
        time.sleep(1.5)
        assert set(cluster.upstreams()) == {"engine-a", "engine-b"}
    finally:
        path.write_text(original)
    wait_for({"engine-a", "engine-b", "llama"})


def test_a_frozen_engine_is_skipped_then_ejected_and_readmitted_when_it_thaws(cluster: Cluster) -> None:
    frozen = cluster.engines["engine-b"]
    assert frozen.proc is not None
    client = cluster.client()
    os.killpg(frozen.proc.pid, signal.SIGSTOP)  # accepts connections (kernel backlog), answers nothing
    try:
        started = time.monotonic()
        answers = [_chat(client, f"Name a fruit ({i}).", max_tokens=4).choices[0].message.content for i in range(6)]
        assert all(answers)
        assert time.monotonic() - started < 60
        deadline = time.monotonic() + 15
        while cluster.upstreams()["engine-b"]["state"] != "ejected" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cluster.upstreams()["engine-b"]["state"] == "ejected"
    finally:
        os.killpg(frozen.proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 15
    while cluster.upstreams()["engine-b"]["state"] != "healthy" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cluster.upstreams()["engine-b"]["state"] == "healthy"


@dataclass
class _Load:
    results: list[tuple[bool, bool, str]] = field(default_factory=list)  # (ok, started, error)
    stop: threading.Event = field(default_factory=threading.Event)


def _stream_loop(client: OpenAI, model: str, load: _Load, worker: int) -> None:
    i = 0
    while not load.stop.is_set():
        i += 1
        started = False
        try:
            stream = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": f"Write a short story ({worker}-{i})."}],
                max_tokens=40,
                temperature=0.7,
                seed=i,
                stream=True,
            )
            finish = None
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    started = True
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
            load.results.append((finish in ("stop", "length"), started, f"finish={finish}"))
        except (APIError, httpx.HTTPError) as exc:
            load.results.append((False, started, f"{type(exc).__name__}: {exc}"))


def test_kill_9_of_an_engine_under_load(cluster: Cluster) -> None:
    victim = cluster.engines["engine-a"]
    model = cluster.client().models.list().data[0].id
    load = _Load()
    workers = [
        threading.Thread(target=_stream_loop, args=(cluster.client(w % 2), model, load, w), daemon=True)
        for w in range(6)
    ]
    for w in workers:
        w.start()
    try:
        time.sleep(3.0)
        assert victim.proc is not None
        os.killpg(victim.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        victim.proc.wait()
        ejected_after = {}
        while len(ejected_after) < 2 and time.monotonic() - killed < 10:
            for g in range(2):
                if g not in ejected_after and cluster.upstreams(g)["engine-a"]["state"] == "ejected":
                    ejected_after[g] = time.monotonic() - killed
            time.sleep(0.05)
        assert sorted(ejected_after) == [0, 1] and max(ejected_after.values()) <= 5.0, ejected_after
        time.sleep(2.0)
        back = _engine(victim.data_dir, victim.port)  # same address, as a restarted pod or container
        cluster.engines["engine-a"] = back
        served_at_restart = cluster.served_by_both()["engine-a"]
        # readmitted by both gateways and taking traffic again (through either: each routes on its
        # own view of the loads); a wait, generous for a slow machine, not a timing target
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = [cluster.upstreams(g)["engine-a"]["state"] for g in range(2)]
            if state == ["healthy", "healthy"] and cluster.served_by_both()["engine-a"] > served_at_restart:
                break
            time.sleep(0.2)
        views = [cluster.upstreams(g) for g in range(2)]
        assert state == ["healthy", "healthy"], views
        assert cluster.served_by_both()["engine-a"] > served_at_restart, (served_at_restart, views)
    finally:
        load.stop.set()
        for w in workers:
            w.join(timeout=120)
    failed = [r for r in load.results if not r[0]]
    not_started = [r for r in failed if not r[1]]
    assert len(load.results) >= 12, load.results
    assert not_started == [], not_started
