"""Send one streaming request to an OpenAI-compatible server and time it.

Timings are taken with `time.perf_counter()` on the client: TTFT is the first chunk that carries
text (a role-only first chunk does not count), ITL the gaps between text-carrying chunks.
Output tokens come from the usage chunk (`stream_options.include_usage`) when the server sends one,
otherwise from the number of text-carrying chunks (one token per chunk, as most servers stream).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from deepseek_serve.bench.sse import DONE, SSEParser, error_message, parse_chunk
from deepseek_serve.bench.workloads import RequestSpec

# status labels for failures that have no HTTP status
STATUS_TIMEOUT = "timeout"
STATUS_CONNECT = "connection"
STATUS_STREAM = "stream-error"


@dataclass
class RequestResult:
    """One request as the client saw it. Times in seconds; `sent_at` is relative to the phase start."""

    index: int
    sent_at: float
    status: str = "200"  # HTTP status, or a STATUS_* label
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    e2e: float = 0.0
    prompt_tokens: int | None = None
    output_tokens: int = 0
    usage_reported: bool = False
    finish_reason: str | None = None
    itl: list[float] = field(default_factory=list)
    text: str = ""

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None below two tokens."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["itl"], data["text"]
        data["tpot"] = self.tpot
        return data


@dataclass(frozen=True)
class ClientOptions:
    model: str
    endpoint: str = "chat"  # "chat" | "completions"
    ignore_eos: bool = False
    stream_usage: bool = True
    timeout_s: float = 600.0
    extra_body: dict[str, Any] = field(default_factory=dict, hash=False)


def request_body(spec: RequestSpec, options: ClientOptions) -> dict[str, Any]:
    body: dict[str, Any] = {"model": options.model, **spec.body, "stream": True}
    if options.stream_usage:
        body["stream_options"] = {"include_usage": True}
    if options.ignore_eos:
        # not an OpenAI field; vLLM, llama.cpp's server and deepseek-serve accept it.
        body["ignore_eos"] = True
    body.update(options.extra_body)
    return body


async def send(
    client: httpx.AsyncClient, spec: RequestSpec, options: ClientOptions, sent_at: float, keep_text: bool = False
) -> RequestResult:
    """Send `spec` as a streaming request; never raises for server or network failures."""
    result = RequestResult(index=spec.index, sent_at=sent_at, status="")  # "" until a response arrives
    path = "/chat/completions" if options.endpoint == "chat" else "/completions"
    start = time.perf_counter()
    for attempt in (1, 2):
        try:
            await asyncio.wait_for(
                _stream(client, path, request_body(spec, options), result, start, keep_text), timeout=options.timeout_s
            )
        except asyncio.TimeoutError:
            result.status, result.error = STATUS_TIMEOUT, f"no complete answer within {options.timeout_s:g}s"
        except httpx.TimeoutException as exc:
            result.status, result.error = STATUS_TIMEOUT, f"{type(exc).__name__}: {exc}"
        except httpx.RemoteProtocolError as exc:
            # a kept-alive connection that the server closed meanwhile (llama-server does): nothing
            # was answered, so the request goes once more, on a new connection.
            if attempt == 1 and not result.status:
                continue
            result.status, result.error = STATUS_CONNECT, f"{type(exc).__name__}: {exc}"
        except httpx.HTTPError as exc:
            result.status, result.error = STATUS_CONNECT, f"{type(exc).__name__}: {exc}"
        break
    result.e2e = time.perf_counter() - start
    if result.error is not None:
        result.ok = False
    return result


async def _stream(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], result: RequestResult, start: float, keep_text: bool
) -> None:
    async with client.stream("POST", path, json=body) as response:
        result.status = str(response.status_code)
        if response.status_code != 200:
            result.error = error_message(await response.aread())
            return
        parser = SSEParser()
        num_text_chunks = 0
        last_token_at: float | None = None
        parts: list[str] = []
        async for raw in response.aiter_bytes():
            now = time.perf_counter()
            for event in parser.feed(raw):
                if event.data.strip() == DONE:
                    result.ok = result.error is None
                    break
                chunk = parse_chunk(event.data)
                if chunk.error is not None:
                    result.status, result.error = STATUS_STREAM, chunk.error
                    continue
                if chunk.usage is not None:
                    result.usage_reported = True
                    result.prompt_tokens = chunk.usage.prompt_tokens
                    result.output_tokens = chunk.usage.completion_tokens
                if chunk.finish_reason is not None:
                    result.finish_reason = chunk.finish_reason
                if chunk.text:
                    num_text_chunks += 1
                    if last_token_at is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last_token_at)
                    last_token_at = now
                    if keep_text:
                        parts.append(chunk.text)
        if not result.usage_reported:
            result.output_tokens = num_text_chunks
        if not result.ok and result.error is None:
            # a stream that ends without [DONE] was cut off (server crash, proxy timeout).
            result.status, result.error = STATUS_STREAM, "stream ended without [DONE]"
        result.text = "".join(parts)
