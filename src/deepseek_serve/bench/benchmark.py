"""A whole benchmark run: pick the model, warm up, run each phase, return the results document."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from deepseek_serve.bench.client import ClientOptions, send
from deepseek_serve.bench.report import run_document
from deepseek_serve.bench.runner import OnResult, Phase, PhaseResult, run_phase
from deepseek_serve.bench.sse import error_message
from deepseek_serve.bench.workloads import Endpoint, Workload


class BenchError(RuntimeError):
    """The benchmark cannot start (server unreachable, no model, bad options)."""


@dataclass(frozen=True)
class BenchConfig:
    base_url: str
    phases: tuple[Phase, ...]
    workload: str = "short"
    api_key: str = ""
    model: str = ""  # empty = first of /v1/models
    endpoint: Endpoint = "chat"
    max_tokens: int | None = None  # None = the workload's default
    temperature: float = 0.0
    ignore_eos: bool = False
    stream_usage: bool = True
    timeout_s: float = 600.0
    seed: int = 0
    warmup: int = 0
    prompt_words: int = 600
    label: str = ""
    server_pid: int | None = None
    extra_body: dict[str, Any] = field(default_factory=dict, hash=False)


def normalize_base_url(url: str) -> str:
    """Strip a trailing slash; a bare host (no path) gets `/v1`, as OpenAI-compatible servers mount it."""
    url = url.rstrip("/")
    if httpx.URL(url).path in ("", "/"):
        url += "/v1"
    return url


def make_client(config: BenchConfig, max_connections: int) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    timeout = httpx.Timeout(config.timeout_s, connect=min(config.timeout_s, 30.0))
    return httpx.AsyncClient(
        base_url=normalize_base_url(config.base_url), headers=headers, limits=limits, timeout=timeout
    )


async def first_model(client: httpx.AsyncClient) -> str:
    """The id of the first model in GET /models."""
    try:
        response = await client.get("/models")
    except httpx.HTTPError as exc:
        raise BenchError(f"cannot reach {client.base_url}: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise BenchError(
            f"GET {client.base_url}/models answered {response.status_code}: {error_message(response.content)}"
        )
    data = response.json().get("data") or []
    if not data:
        raise BenchError(f"GET {client.base_url}/models lists no model; pass --model")
    return str(data[0]["id"])


def _max_connections(phases: tuple[Phase, ...]) -> int:
    # open loop: no client-side cap beyond a generous pool, so the server sees the offered load
    return max(int(p.value) if p.mode == "closed" else 1000 for p in phases)


async def run_benchmark(config: BenchConfig, on_result: OnResult | None = None, on_phase: Any = None) -> dict[str, Any]:
    """Run every phase of `config` in order; returns the results document (see report.py)."""
    if not config.phases:
        raise BenchError("nothing to run: give --concurrency and/or --rate")
    async with make_client(config, _max_connections(config.phases)) as client:
        model = config.model or await first_model(client)
        workload = Workload(
            config.workload,
            seed=config.seed,
            max_tokens=config.max_tokens,
            temperature=config.temperature,
            endpoint=config.endpoint,
            prompt_words=config.prompt_words,
        )
        options = ClientOptions(
            model=model,
            endpoint=config.endpoint,
            ignore_eos=config.ignore_eos,
            stream_usage=config.stream_usage,
            timeout_s=config.timeout_s,
            extra_body=config.extra_body,
        )
        for i in range(config.warmup):
            # warm-up requests use indexes no phase uses, so they do not pre-fill caches for them.
            warm = await send(client, workload.request(10_000_000 + i), options, sent_at=0.0)
            if not warm.ok:
                raise BenchError(f"warm-up request failed ({warm.status}): {warm.error}")
        results: list[PhaseResult] = []
        first_index = 0
        for phase in config.phases:
            if on_phase:
                on_phase(phase)
            result = await run_phase(
                client,
                workload,
                options,
                phase,
                seed=config.seed,
                first_index=first_index,
                on_result=on_result,
                server_pid=config.server_pid,
            )
            results.append(result)
            first_index += len(result.requests)
    meta = {k: v for k, v in asdict(config).items() if k not in ("phases", "api_key")}
    meta.update(model=model, base_url=normalize_base_url(config.base_url), max_tokens=workload.max_tokens)
    return run_document(meta, results)
