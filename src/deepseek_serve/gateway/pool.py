"""UpstreamPool: the live upstreams, their health loop, and opening a request on the one the
routing policy picks (with retries on others while no token has been produced)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import orjson

from deepseek_serve.engine.errors import EngineStoppedError, InvalidRequestError, QueueFullError
from deepseek_serve.gateway.http import ConnectFailed, ConnectionLost, HttpError, Response
from deepseek_serve.gateway.routing import Candidate, PrefixRouter
from deepseek_serve.gateway.upstreams import (
    Upstream,
    UpstreamSource,
    UpstreamSpec,
    auth_headers,
    check,
    close_quietly,
    expand,
    is_discovered,
    new_client,
)

logger = logging.getLogger(__name__)

_MAX_ERROR_BYTES = 16 * 1024
# an upstream's answer that is the client's fault: returned as is, not retried elsewhere
_CLIENT_ERRORS = (400, 413, 422)


class UpstreamFailure(Exception):
    """An upstream could not serve a request (connection, 5xx, stream cut); `hard` = refused connection."""

    def __init__(self, message: str, *, hard: bool = False, busy: bool = False) -> None:
        super().__init__(message)
        self.hard = hard
        self.busy = busy  # 429: full, not broken


class UpstreamPool:
    def __init__(
        self,
        source: UpstreamSource,
        *,
        secret: str,
        health_interval_s: float,
        connect_timeout_s: float,
        header_timeout_s: float,
        eject_failures: int,
        eject_s: float,
        busy_margin: float,
    ) -> None:
        self.source = source
        self.secret = secret
        self.health_interval_s = health_interval_s
        self.connect_timeout_s = connect_timeout_s
        self.header_timeout_s = header_timeout_s
        self.eject_failures = eject_failures
        self.eject_s = eject_s
        self.router = PrefixRouter(busy_margin=busy_margin)
        self.upstreams: dict[str, Upstream] = {}
        self._declared: list[UpstreamSpec] = []
        self._task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    # --- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the list, run one round of health checks, then check every interval in the background."""
        self._declared = self.source.load()
        self._apply(await expand(self._declared))
        await self.check_all()
        self._task = asyncio.create_task(self._loop(), name="gateway-health")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for up in self.upstreams.values():
            await close_quietly(up.client)
        self.upstreams.clear()

    def _apply(self, specs: list[UpstreamSpec]) -> None:
        wanted = {s.name: s for s in specs}
        for name in [n for n, up in self.upstreams.items() if wanted.get(n) != up.spec]:
            up = self.upstreams.pop(name)
            self.router.drop(name)
            # requests in flight keep their own response objects; the client closes once they end.
            task = asyncio.get_running_loop().create_task(_close_when_idle(up))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            logger.info("upstream %s removed", name)
        for name, spec in wanted.items():
            if name not in self.upstreams:
                self.upstreams[name] = Upstream(
                    spec=spec, client=new_client(spec, self.connect_timeout_s), kind=spec.kind, capacity=spec.capacity
                )
                logger.info("upstream %s added (%s)", name, spec.url)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                changed = self.source.poll()
                if changed is not None:
                    self._declared = changed
                if changed is not None or any(is_discovered(s) for s in self._declared):
                    self._apply(await expand(self._declared))
                await self.check_all()
            except Exception:
                logger.exception("upstream health round failed")

    async def check_all(self) -> None:
        ups = list(self.upstreams.values())
        now = time.monotonic()
        due = [u for u in ups if not u.open or now >= u.open_until]
        results = await asyncio.gather(*(check(u, self.secret, self.connect_timeout_s) for u in due))
        for up, (ok, hard, why) in zip(due, results, strict=True):
            if ok:
                if up.open:
                    logger.info("upstream %s readmitted", up.name)
                elif not up.ever_healthy:
                    logger.info("upstream %s healthy (%s)", up.name, up.kind)
                up.open = False
                up.ever_healthy = True
                up.success()
            elif up.ever_healthy or up.open:
                self.failed(up, UpstreamFailure(why, hard=hard), count=False)
            else:
                logger.debug("upstream %s not up yet: %s", up.name, why)

    # --- state -------------------------------------------------------------------------------------
    def available(self) -> list[Upstream]:
        return [u for u in self.upstreams.values() if u.available()]

    def failed(self, up: Upstream, exc: UpstreamFailure, *, count: bool = True) -> None:
        if count:
            up.failed_total += 1
        if up.failure(hard=exc.hard, threshold=self.eject_failures, eject_s=self.eject_s, why=str(exc)):
            self.router.drop(up.name)

    # --- requests ----------------------------------------------------------------------------------
    async def open(
        self,
        body: dict[str, Any],
        prompt: str,
        token_ids: list[int],
        affinity: str | None,
        tried: set[str],
        attempts: int,
    ) -> tuple[Upstream, Response]:
        """POST a streaming completion to the chosen upstream; on a failure before any token, to
        another one, up to `attempts` upstreams in all. Returns the upstream (its in-flight count
        raised: call `release`) and the response with status 200, headers read.

        Raises InvalidRequestError for the client's own errors (400/413/422 from the upstream),
        QueueFullError when every upstream tried was full, EngineStoppedError when none could serve."""
        busy = False
        last = "no upstream is available"
        for _ in range(attempts):
            candidates = [u for u in self.available() if u.name not in tried]
            if not candidates:
                break
            name = self.router.choose(
                prompt, affinity, [Candidate(u.name, u.load(), u.cached_blocks) for u in candidates], token_ids
            )
            up = self.upstreams[name]
            tried.add(name)
            up.inflight += 1
            try:
                return up, await self._send(up, body)
            except UpstreamFailure as exc:
                self.release(up)
                last = f"{name}: {exc}"
                if exc.busy:
                    busy = True
                else:
                    self.failed(up, exc)
                logger.warning(
                    "upstream %s failed before the first token (%s); %s",
                    name,
                    exc,
                    "retrying on another" if len(tried) < attempts else "giving up",
                )
            except BaseException:
                self.release(up)
                raise
        if busy:
            waiting = sum(int(u.report.get("waiting", 0) or 0) for n, u in self.upstreams.items() if n in tried)
            raise QueueFullError(waiting, retry_after_s=1.0)
        # the client sees no upstream names or addresses; the log has them.
        logger.error("no upstream could take the request (tried %s; last: %s)", sorted(tried) or "none", last)
        raise EngineStoppedError("No upstream server is available to take the request.")

    def release(self, up: Upstream) -> None:
        up.inflight = max(up.inflight - 1, 0)

    async def _send(self, up: Upstream, body: dict[str, Any]) -> Response:
        payload = dict(body)
        payload["model"] = up.spec.model or body["model"]
        headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            **auth_headers(up, self.secret),
        }
        content = orjson.dumps(payload)
        try:
            async with asyncio.timeout(self.header_timeout_s):
                try:
                    response = await up.client.request("POST", "/v1/completions", headers=headers, body=content)
                except ConnectionLost as exc:
                    if not exc.reused:
                        raise
                    # a pooled keep-alive connection the server closed as we reused it: the
                    # request never reached the application; once more, on a fresh connection.
                    response = await up.client.request("POST", "/v1/completions", headers=headers, body=content)
        except TimeoutError:
            raise UpstreamFailure(f"no response headers within {self.header_timeout_s:g}s") from None
        except ConnectFailed as exc:
            raise UpstreamFailure(str(exc), hard=True) from None
        except HttpError as exc:
            raise UpstreamFailure(f"{type(exc).__name__}: {exc}") from None
        if response.status_code == 200:
            return response
        try:
            raw = await _read_capped(response)
        finally:
            await response.aclose()
        if response.status_code in _CLIENT_ERRORS:
            message, param = _error_message(raw)
            raise InvalidRequestError(
                message or f"the upstream refused the request ({response.status_code})", param=param
            )
        if response.status_code == 429:
            raise UpstreamFailure("full (429)", busy=True)
        raise UpstreamFailure(f"answered {response.status_code}: {_error_message(raw)[0][:200]}")


async def _read_capped(response: Response) -> bytes:
    with contextlib.suppress(HttpError):
        return await response.read(_MAX_ERROR_BYTES)
    return b""


def _error_message(raw: bytes) -> tuple[str, str | None]:
    """(message, param) of an OpenAI-shaped error body; the raw text when it is not one."""
    try:
        err = orjson.loads(raw).get("error")
        if isinstance(err, dict):
            param = err.get("param")
            return str(err.get("message", "")), param if isinstance(param, str) else None
        if isinstance(err, str):
            return err, None
    except (ValueError, AttributeError):
        pass
    return raw.decode("utf-8", "replace"), None


async def _close_when_idle(up: Upstream) -> None:
    while up.inflight > 0:  # noqa: ASYNC110 - counts live requests, no event to wait on
        await asyncio.sleep(1.0)
    await close_quietly(up.client)
