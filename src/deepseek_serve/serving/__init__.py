"""The request path between the HTTP routes and the engine, free of any web framework.

- `plan`: the `GenerationPlan` a route builds from a validated body; `checks`: limits it must keep;
  `prompts`: chat template and tokenizer off the event loop
- `generate`: `serve_generation`, the flow (admission, response cache, engine, answer, accounting)
- `run`: a request's choices in the engine; `choice`: one choice's state
- `collect` (JSON answer), `stream` (SSE answer), `render` (bodies and chunks), `sse` (framing)
- `accounting`: the one usage summary of a request and the hooks at its end (limiter, usage,
  conversation, metrics)
- `failures`: every failure as status, OpenAI error body and Retry-After
- `response_cache`, `reasoning`, `structured`, `tools`: response-cache use, `<think>` splitting,
  `response_format` grammars, tool calls
- `schemas`: the request and response bodies in OpenAI's shapes; `services`: the `Services` container
"""
