"""The gateway's upstreams: where they are (settings or a YAML file), whether they may take work
(health checks, passive ejection, a circuit breaker per upstream) and how loaded they are.

`DS_UPSTREAMS` is either comma-separated base URLs (`http://engine-1:8000,http://engine-2:8000`) or
the path of a YAML file, re-read when its modification time changes:

```yaml
upstreams:
  - url: http://engine-1:8000        # base URL; requests go to <url>/v1/completions
  - url: dns+http://engines:8000     # one upstream per address the name resolves to (re-resolved)
    name: engine-1                   # optional, unique; default: host:port of the URL
    model: smollm2-135m-instruct     # the name this upstream serves the model under; default: the gateway's id
    kind: auto                       # deepseek (load report) | openai (any OpenAI-compatible server) | auto
    capacity: 8                      # openai kind: concurrent requests at full load (deepseek engines report it)
    api_key: ...                     # bearer token sent; default DS_ENGINE_SECRET (not to kind openai)
```

Each upstream has a breaker: closed (takes requests) -> open (ejected) after
`DS_GATEWAY_EJECT_FAILURES` errors in a row, or at once when a connection is refused; after
`DS_GATEWAY_EJECT_S` the next health check is the half-open trial: it passing closes the breaker
(readmitted), failing keeps it open for another period.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson

from deepseek_serve.engine import prefix_summary
from deepseek_serve.gateway.http import Client, ConnectFailed, HttpError

logger = logging.getLogger(__name__)

Kind = Literal["auto", "deepseek", "openai"]
_KINDS = ("auto", "deepseek", "openai")
LOAD_PATH = "/internal/load"
_MAX_FILE_BYTES = 1024 * 1024
_MAX_REPORT_BYTES = 64 * 1024


class UpstreamConfigError(ValueError):
    """DS_UPSTREAMS (or its YAML file) is malformed; the message says where."""


@dataclass(frozen=True)
class UpstreamSpec:
    name: str
    url: str  # scheme://host[:port][/prefix], no trailing slash
    model: str | None = None
    kind: Kind = "auto"
    capacity: int = 8
    api_key: str | None = None


def _check_url(url: str, where: str) -> str:
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "dns+http", "dns+https") or not parts.hostname:
        raise UpstreamConfigError(f"{where}: {url!r} is not an http(s) (or dns+http(s)) base URL")
    if parts.query or parts.fragment:
        raise UpstreamConfigError(f"{where}: {url!r} must not have a query or fragment")
    return url


def _default_name(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or (443 if parts.scheme.endswith('https') else 80)}{parts.path}"


def is_discovered(spec: UpstreamSpec) -> bool:
    """`dns+http://name:port`: one upstream per address the name resolves to (a headless Kubernetes
    Service, Compose replicas), re-resolved every health round."""
    return spec.url.startswith(("dns+http://", "dns+https://"))


async def expand(specs: list[UpstreamSpec]) -> list[UpstreamSpec]:
    """Specs with every `dns+` entry replaced by one spec per resolved address (none when the name
    does not resolve: no replica is up)."""
    loop = asyncio.get_running_loop()
    out: list[UpstreamSpec] = []
    for spec in specs:
        if not is_discovered(spec):
            out.append(spec)
            continue
        parts = urlsplit(spec.url[len("dns+") :])
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            infos = await loop.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            logger.debug("upstream %s: %s does not resolve (%s)", spec.name, parts.hostname, exc)
            continue
        for ip in sorted({str(info[4][0]) for info in infos}):
            host = f"[{ip}]" if ":" in ip else ip
            out.append(replace(spec, name=f"{spec.name}/{ip}", url=f"{parts.scheme}://{host}:{port}{parts.path}"))
    return out


def is_file_source(value: str) -> bool:
    """A value naming a YAML file (rather than URLs)."""
    value = value.strip()
    return "://" not in value and (value.endswith((".yaml", ".yml")) or Path(value).is_file())


def parse_urls(value: str) -> list[UpstreamSpec]:
    specs = [
        UpstreamSpec(name=_default_name(u), url=u)
        for u in (_check_url(item, "DS_UPSTREAMS") for item in value.split(",") if item.strip())
    ]
    return _unique(specs, "DS_UPSTREAMS")


def parse_yaml(text: str, where: str) -> list[UpstreamSpec]:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UpstreamConfigError(f"{where}: not valid YAML ({exc})") from None
    items = data.get("upstreams") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise UpstreamConfigError(f"{where}: expected a mapping with an 'upstreams' list")
    specs: list[UpstreamSpec] = []
    for i, item in enumerate(items):
        at = f"{where}: upstreams[{i}]"
        if not isinstance(item, dict):
            raise UpstreamConfigError(f"{at}: expected a mapping")
        unknown = set(item) - {"url", "name", "model", "kind", "capacity", "api_key"}
        if unknown:
            raise UpstreamConfigError(f"{at}: unknown field(s) {sorted(unknown)}")
        if not isinstance(item.get("url"), str):
            raise UpstreamConfigError(f"{at}: 'url' (a string) is required")
        url = _check_url(item["url"], at)
        kind = item.get("kind", "auto")
        if kind not in _KINDS:
            raise UpstreamConfigError(f"{at}: 'kind' must be one of {list(_KINDS)}")
        capacity = item.get("capacity", 8)
        if not isinstance(capacity, int) or isinstance(capacity, bool) or not 1 <= capacity <= 100_000:
            raise UpstreamConfigError(f"{at}: 'capacity' must be an integer in [1, 100000]")
        for key in ("name", "model", "api_key"):
            if key in item and not (isinstance(item[key], str) and item[key].strip()):
                raise UpstreamConfigError(f"{at}: '{key}' must be a non-empty string")
        specs.append(
            UpstreamSpec(
                name=item.get("name", _default_name(url)),
                url=url,
                model=item.get("model"),
                kind=kind,
                capacity=capacity,
                api_key=item.get("api_key"),
            )
        )
    return _unique(specs, where)


def _unique(specs: list[UpstreamSpec], where: str) -> list[UpstreamSpec]:
    if not specs:
        raise UpstreamConfigError(f"{where}: no upstreams")
    names = [s.name for s in specs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise UpstreamConfigError(f"{where}: upstream name {dup!r} appears twice (set distinct 'name's)")
    return specs


class UpstreamSource:
    """DS_UPSTREAMS: fixed URLs, or a YAML file whose changes `poll()` picks up."""

    def __init__(self, value: str) -> None:
        self.value = value.strip()
        self.path = Path(self.value) if is_file_source(self.value) else None
        self._stamp: tuple[int, int] | None = None

    def load(self) -> list[UpstreamSpec]:
        """The current list; raises UpstreamConfigError (also for a missing or oversized file)."""
        if self.path is None:
            return parse_urls(self.value)
        try:
            st = self.path.stat()
            if st.st_size > _MAX_FILE_BYTES:
                raise UpstreamConfigError(f"{self.path}: larger than {_MAX_FILE_BYTES} bytes")
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UpstreamConfigError(f"{self.path}: cannot read ({exc.strerror})") from None
        self._stamp = (st.st_mtime_ns, st.st_size)
        return parse_yaml(text, str(self.path))

    def poll(self) -> list[UpstreamSpec] | None:
        """A new list when the file changed since the last load; None when unchanged (or URLs).
        A broken edit is logged and ignored: the last good list stays in force."""
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        if (st.st_mtime_ns, st.st_size) == self._stamp:
            return None
        try:
            return self.load()
        except UpstreamConfigError as exc:
            self._stamp = (st.st_mtime_ns, st.st_size)
            logger.error("upstreams file not reloaded, keeping the previous list: %s", exc)
            return None


FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
"""Upper bounds (seconds) of the per-upstream time-to-first-token histogram (the engines' TTFT buckets)."""


@dataclass(frozen=True)
class UpstreamState:
    """What `/metrics` exports of one upstream."""

    name: str
    available: bool
    load: float
    inflight: int
    served_total: int
    failed_total: int
    ejections_total: int
    first_token_counts: tuple[int, ...] = ()  # per FIRST_TOKEN_BUCKETS bound, then +Inf; not cumulative
    first_token_sum: float = 0.0


@dataclass
class Upstream:
    """One upstream's live state. Mutated only on the event loop."""

    spec: UpstreamSpec
    client: Client
    kind: Kind = "auto"
    open: bool = False  # breaker open = ejected
    open_until: float = 0.0
    ever_healthy: bool = False
    failures: int = 0
    inflight: int = 0
    reported_busy: int = 0  # running + waiting in the last load report
    inflight_at_report: int = 0
    capacity: int = 8
    report: dict[str, Any] = field(default_factory=dict)
    cached_blocks: frozenset[bytes] = frozenset()  # its prefix-cache summary (engine/prefix_summary.py)
    cached_blocks_text: str = ""  # ...as last reported, to decode only changes
    served_total: int = 0
    failed_total: int = 0
    ejections_total: int = 0
    first_token_counts: list[int] = field(default_factory=lambda: [0] * (len(FIRST_TOKEN_BUCKETS) + 1))
    first_token_sum: float = 0.0

    @property
    def name(self) -> str:
        return self.spec.name

    def available(self) -> bool:
        return self.ever_healthy and not self.open

    def load(self) -> float:
        """(running + waiting + this gateway's in-flight) / capacity; the report already counts the
        requests this gateway had in flight when it was taken."""
        others = max(self.reported_busy - self.inflight_at_report, 0)
        return (others + self.inflight) / max(self.capacity, 1)

    def success(self) -> None:
        self.failures = 0

    def observe_first_token(self, seconds: float) -> None:
        """From sending a request here to its first token (connect, queue and prefill upstream)."""
        self.first_token_counts[bisect.bisect_left(FIRST_TOKEN_BUCKETS, seconds)] += 1
        self.first_token_sum += seconds

    def failure(self, *, hard: bool, threshold: int, eject_s: float, why: str) -> bool:
        """Count an error; True when this one ejects the upstream (opens the breaker)."""
        self.failures += 1
        if self.open:
            self.open_until = time.monotonic() + eject_s
            return False
        if hard or self.failures >= threshold:
            self.open = True
            self.open_until = time.monotonic() + eject_s
            self.ejections_total += 1
            logger.warning("upstream %s ejected for %.1fs: %s", self.name, eject_s, why)
            return True
        return False

    def metrics_snapshot(self) -> UpstreamState:
        return UpstreamState(
            name=self.name,
            available=self.available(),
            load=self.load(),
            inflight=self.inflight,
            served_total=self.served_total,
            failed_total=self.failed_total,
            ejections_total=self.ejections_total,
            first_token_counts=tuple(self.first_token_counts),
            first_token_sum=self.first_token_sum,
        )

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.spec.url,
            "model": self.spec.model,
            "kind": self.kind,
            "state": "ejected" if self.open else ("healthy" if self.ever_healthy else "unknown"),
            "load": None if math.isinf(self.load()) else round(self.load(), 4),
            "inflight": self.inflight,
            "capacity": self.capacity,
            "consecutive_failures": self.failures,
            "served_total": self.served_total,
            "failed_total": self.failed_total,
            "ejections_total": self.ejections_total,
            "report": self.report,
        }


def auth_headers(up: Upstream, secret: str) -> dict[str, str]:
    """The upstream's own `api_key`, else DS_ENGINE_SECRET, which goes only to our engines (and to
    `auto` upstreams until a probe shows they are not ours), never to other servers."""
    token = up.spec.api_key or (secret if up.kind != "openai" else "")
    return {"Authorization": f"Bearer {token}"} if token else {}


async def check(up: Upstream, secret: str, timeout_s: float) -> tuple[bool, bool, str]:
    """One active health check: (passed, hard failure, reason). Fills the load report on success.
    `auto` upstreams are probed for our load report first and fall back to `/health`."""
    headers = auth_headers(up, secret)
    try:
        async with asyncio.timeout(timeout_s):
            if up.kind in ("auto", "deepseek"):
                status, content = await up.client.get(LOAD_PATH, headers=headers, limit=_MAX_REPORT_BYTES + 1)
                if status == 404 and up.kind == "auto":
                    up.kind = "openai"
                elif status == 200:
                    up.kind = "deepseek"
                    if len(content) > _MAX_REPORT_BYTES:
                        return False, False, "load report too large"
                    report = orjson.loads(content)
                    if not isinstance(report, dict):
                        return False, False, "load report is not an object"
                    up.report = report
                    _take_prefix_summary(up, report)
                    up.reported_busy = int(report.get("running", 0)) + int(report.get("waiting", 0))
                    up.inflight_at_report = up.inflight
                    up.capacity = max(int(report.get("max_batch_size", up.spec.capacity)), 1)
                    if not report.get("ready", False):
                        return False, False, "engine reports not ready"
                    return True, False, ""
                else:
                    return False, False, f"load report answered {status}"
            status, _ = await up.client.get("/health", headers=headers, limit=_MAX_REPORT_BYTES)
        up.capacity = up.spec.capacity
        up.reported_busy = up.inflight
        up.inflight_at_report = up.inflight
        if status == 200:
            return True, False, ""
        return False, False, f"/health answered {status}"
    except ConnectFailed as exc:
        return False, True, str(exc)
    except TimeoutError:
        return False, False, f"health check timed out after {timeout_s:g}s"
    except (HttpError, ValueError, TypeError) as exc:
        return False, False, f"health check failed ({type(exc).__name__}: {exc})"


def _take_prefix_summary(up: Upstream, report: dict[str, Any]) -> None:
    """Move the report's prefix-cache digests to `up.cached_blocks` (an unknown scheme or a malformed
    summary counts as an empty one); the report keeps their count."""
    cache = report.get("prefix_cache")
    if not isinstance(cache, dict):
        up.cached_blocks, up.cached_blocks_text = frozenset(), ""
        return
    text = cache.pop("blocks", "")
    if cache.get("scheme") != prefix_summary.SCHEME or not isinstance(text, str):
        text = ""
    if text != up.cached_blocks_text:
        try:
            up.cached_blocks = prefix_summary.decode(text)
        except ValueError as exc:
            logger.debug("upstream %s: prefix summary ignored (%s)", up.name, exc)
            up.cached_blocks = frozenset()
        up.cached_blocks_text = text
    cache["blocks_held"] = len(up.cached_blocks)


def new_client(spec: UpstreamSpec, connect_timeout_s: float) -> Client:
    """One keep-alive client per upstream. Reads have no timeout of their own (a queued request may
    wait long upstream): the header timeout and the request deadline bound them."""
    return Client(spec.url, connect_timeout_s=connect_timeout_s)


async def close_quietly(client: Client) -> None:
    with contextlib.suppress(Exception):
        await client.aclose()
