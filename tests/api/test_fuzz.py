"""schemathesis against the server's own OpenAPI document: every route, auth on, once with the admin key
and once with a normal (inference-only) key, stateful links included (a created conversation or key
into the routes that take its id).

The checks: no 5xx; every response documented (status, content type, headers) and matching its schema;
schema-violating input refused; a request without the key refused (401/403); a created resource
readable and a deleted one gone; undocumented methods refused.

The server is a real `deepseek-serve serve` process on MariaDB and Redis with the SmolLM2 test
model. Generation is what makes a fuzz run slow, so this server caps it: a sequence is at most
`DS_MAX_MODEL_LEN=96` tokens (prompt + completion; longer asks are refused with a 400, which the fuzzer
also exercises) and a request without `max_tokens` gets 8. Two runs take about 2 minutes on 2 shared
cores. Rate limits stay off (a 429 is documented, but would end most generated requests before they
reach validation).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.cache import delete_prefix, redis_url, unique_prefix
from tests.support.server import ServeProcess
from tests.support.storage import create_database, mariadb, mariadb_exec

pytestmark = pytest.mark.slow

# `st` in this interpreter. hypothesis names the lambdas of a strategy (for its repr) by parsing their
# source with ast.parse; on Python 3.11 that can fail with "SystemError: AST constructor recursion depth
# mismatch" (a CPython bug in ast's recursion accounting) while schemathesis builds the recursive chat
# message schema, which ends the run with a runtime error. The names only decorate reprs: skip them.
ST = [
    sys.executable,
    "-c",
    "import sys; import hypothesis.internal.lambda_sources as l; l.lambda_description = lambda f: 'lambda'; "
    "from schemathesis.cli import schemathesis; sys.argv[0] = 'st'; sys.exit(schemathesis())",
]
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
        "ignored_auth",
        "use_after_free",
        "ensure_resource_availability",
        "unsupported_method",
        "missing_required_header",
    ]
)
# test cases per operation and phase; the two runs together send well over 2,000 requests
MAX_EXAMPLES = int(os.environ.get("DS_TEST_FUZZ_EXAMPLES", "40"))
MIN_REQUESTS_PER_RUN = 1000


class FuzzServer:
    def __init__(self, proc: ServeProcess, admin_key: str, user_key: str) -> None:
        self.proc = proc
        self.admin_key = admin_key
        self.user_key = user_key

    def assert_alive(self) -> None:
        assert self.proc.proc is not None and self.proc.proc.poll() is None, self.proc.stderr()[-3000:]
        assert httpx.get(f"{self.proc.url}/health/live", timeout=10).status_code == 200


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzServer]:
    redis = redis_url()
    db = asyncio.run(create_database("ds_test_fuzz"))
    prefix = unique_prefix()
    admin_key = f"sk-fuzzadmin{uuid.uuid4().hex}"
    env = {
        "DS_AUTH": "on",
        "DS_ADMIN_KEY": admin_key,
        "DS_DATABASE_URL": mariadb().url(db),
        "DS_DB_AUTO_MIGRATE": "true",
        "DS_REDIS_URL": redis,
        "DS_REDIS_KEY_PREFIX": prefix,
        "DS_MAX_MODEL_LEN": "96",
        "DS_DEFAULT_MAX_TOKENS": "8",
        "DS_REQUEST_TIMEOUT_S": "60",
        "DS_LOG_LEVEL": "warning",
        # the failed-auth throttle would answer the fuzzer's key-less requests with 429 instead of 401
        "DS_AUTH_FAILURES_PER_MIN": "0",
    }
    try:
        with ServeProcess(tmp_path_factory.mktemp("fuzz"), timeout_s=180, **env) as proc:
            created = httpx.post(
                f"{proc.url}/admin/keys",
                headers={"Authorization": f"Bearer {admin_key}"},
                json={"name": "fuzz-user", "scopes": ["inference"]},
                timeout=30,
            )
            assert created.status_code == 201, created.text
            yield FuzzServer(proc, admin_key, created.json()["key"])
    finally:
        delete_prefix(redis, prefix)
        asyncio.run(mariadb_exec(f"DROP DATABASE IF EXISTS `{db}`"))


def run_schemathesis(server: FuzzServer, key: str, report_dir: Path, seed: int) -> dict[str, int]:
    """One `st run` over every operation; returns the JSON report's counts. Fails on any failure."""
    command = [
        *ST,
        "run",
        f"{server.proc.url}/openapi.json",
        "--header",
        f"Authorization: Bearer {key}",
        "--checks",
        CHECKS,
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(seed),
        "--workers",
        "2",
        "--request-timeout",
        "60",
        "--suppress-health-check",
        "all",
        "--continue-on-failure",
        "--max-failures",
        "50",
        "--report",
        "json,ndjson",
        "--report-dir",
        str(report_dir),
        "--output-truncate",
        "false",
        "--warnings",
        "off",
        *os.environ.get("DS_TEST_FUZZ_ARGS", "").split(),  # e.g. --include-path /v1/completions
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_TELEMETRY": "false"},
        cwd=report_dir.parent,  # schemathesis keeps a .schemathesis/ cache in its working directory
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"schemathesis found failures (exit {result.returncode}):\n{output[-20000:]}"
    return request_counts(report_dir)


def request_counts(report_dir: Path) -> dict[str, int]:
    """Requests sent per HTTP method, read from the ndjson event log."""
    counts: dict[str, int] = {}
    for path in report_dir.glob("*.ndjson"):
        for line in path.read_text().splitlines():
            event = json.loads(line)
            for name, payload in event.items():
                if name == "ScenarioFinished" and isinstance(payload, dict):
                    for interaction in (payload.get("recorder") or {}).get("interactions", {}).values():
                        request = interaction.get("request") or {}
                        label = str(request.get("method"))
                        counts[label] = counts.get(label, 0) + 1
    return counts


def accepted_cases(report_dir: Path, operation: str) -> int:
    """Generated cases of `operation` that the server accepted (2xx), from the JSON run report."""
    (path,) = report_dir.glob("json-*.json")
    phases = json.loads(path.read_text()).get("valid_rates", {}).get(operation, {})
    return sum(int(phase.get("accepted", 0)) for phase in phases.values())


@pytest.mark.parametrize("who", ["admin", "user"])
def test_fuzz_every_route(fuzz_server: FuzzServer, who: str, tmp_path: Path) -> None:
    key = fuzz_server.admin_key if who == "admin" else fuzz_server.user_key
    report_dir = tmp_path / "report"
    counts = run_schemathesis(fuzz_server, key, report_dir, seed=1 if who == "admin" else 2)
    total = sum(counts.values())
    assert total >= MIN_REQUESTS_PER_RUN, f"only {total} requests: {counts}"
    # generation itself was reached, not only refused at the boundary
    for operation in ("POST /v1/chat/completions", "POST /v1/completions"):
        assert accepted_cases(report_dir, operation) > 0, operation
    fuzz_server.assert_alive()
