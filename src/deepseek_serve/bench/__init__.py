"""Load generator for OpenAI-compatible servers (this one, llama.cpp's server, vLLM).

Layout: `workloads` makes deterministic request bodies; `client` sends one streaming request and
times it (`sse` parses the stream); `runner` runs closed- and open-loop phases and computes
metrics (`stats`); `benchmark` runs a whole configuration; `report` writes JSON, Markdown and
PNG plots; `compare` lines two results files up. The CLI is `deepseek-serve bench`.
"""
