"""GGUF models on CPU through llama.cpp's low-level API (llama-cpp-python's ctypes bindings).

Layout: `runner` (LlamaCppRunner), `backend` (process-wide init, model and context creation),
`tokenizer`, `slots` (sequence ids of the unified KV cache, prefix cache), `batch` (the llama_batch
of one step, shared prompt prefixes), `sampling` (native chains, numpy samplers, grammar).
"""

from deepseek_serve.engine.runners.llamacpp.runner import LlamaCppRunner

__all__ = ["LlamaCppRunner"]
