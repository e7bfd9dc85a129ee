"""One choice of a request while it generates: its engine stream and what has arrived so far."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from deepseek_serve.engine.async_engine import RequestStream
from deepseek_serve.engine.types import RequestTimings, StreamDelta, TokenLogprob
from deepseek_serve.serving.reasoning import ReasoningSplitter
from deepseek_serve.serving.schemas import ToolCall
from deepseek_serve.serving.tools import ToolSetup, ToolStream, parse_tool_calls


@dataclass(eq=False)
class ChoiceState:
    index: int
    prompt_index: int
    stream: RequestStream
    splitter: ReasoningSplitter | None  # chat with a reasoning model
    tool_stream: ToolStream | None = None  # a streamed chat with tools
    text_parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    timings: RequestTimings | None = None
    # (monotonic time, tokens) of each delta with tokens; a delta may carry several (speculative
    # decoding, text held back at a stop-string prefix or inside a UTF-8 character)
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    # (content, tool calls) of a chat with tools, parsed once: the answer and the stored conversation
    # turn carry the same call ids
    tool_answer: tuple[str, list[ToolCall]] | None = None
    # the SSE event of a text-only chunk of this choice, cut around the text (render.py builds it)
    chunk_template: tuple[bytes, bytes] | None = None

    def add_delta(self, delta: StreamDelta, arrivals: list[tuple[float, int]] | None = None) -> None:
        """Take in one delta from the engine, or several merged: `arrivals` then holds (time, tokens) of
        each of them with tokens (None: one delta, arrived now)."""
        if arrivals is not None:
            self.arrivals.extend(arrivals)
        elif delta.token_ids:
            self.arrivals.append((time.monotonic(), len(delta.token_ids)))
        if delta.token_ids:
            # a running count, so a stream cut before its last delta (client gone, drain timeout) still
            # accounts for the tokens it got; the last delta's usage replaces it
            self.completion_tokens += len(delta.token_ids)
        if delta.text:
            self.text_parts.append(delta.text)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finished:
            self.finish_reason = delta.finish_reason
            self.error = delta.error
            self.timings = delta.timings
            if delta.usage is not None:
                self.prompt_tokens = delta.usage.prompt_tokens
                self.completion_tokens = delta.usage.completion_tokens
                self.cached_tokens = delta.usage.cached_tokens
                self.drafted_tokens = delta.usage.drafted_tokens
                self.accepted_tokens = delta.usage.accepted_tokens

    def inter_token_latencies(self) -> list[float]:
        """Seconds between tokens: a delta's gap to the previous one, spread over its tokens."""
        out: list[float] = []
        for (before, _), (after, n) in itertools.pairwise(self.arrivals):
            out.extend([(after - before) / n] * n)
        return out

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def content_text(self) -> str:
        """The answer's text less any reasoning."""
        return self.splitter.content_text if self.splitter is not None else self.text

    def tool_calls(self, setup: ToolSetup) -> tuple[str, list[ToolCall]]:
        """(content outside the calls, calls) of the finished answer; a stream sets it when its tool
        stream finishes, a JSON answer parses it here on first use."""
        if self.tool_answer is None:
            content = self.content_text
            self.tool_answer = parse_tool_calls(content, setup) if content else (content, [])
        return self.tool_answer

    def split_whole_text(self) -> None:
        """Feed the whole text to the reasoning splitter at once (a JSON answer; a stream feeds it per delta)."""
        if self.splitter is not None:
            self.splitter.push(self.text)
            self.splitter.flush()
