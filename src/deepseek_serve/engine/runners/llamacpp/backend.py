"""llama.cpp's process-wide backend, model loading (weights memory-mapped, optionally repacked) and
context creation, and the CPU core count the compute threads default to."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import llama_cpp as lc

from deepseek_serve.config import usable_cpus

logger = logging.getLogger(__name__)


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _quiet_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # llama.cpp logs every load detail to stderr; keep errors (level 2 = GGML_LOG_LEVEL_ERROR... 4)
    if level in (2, 4) and text:
        logger.debug("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())


@functools.cache
def init_backend() -> None:
    """Route llama.cpp's log through `logging` and initialize its backend (once per process)."""
    lc.llama_log_set(_quiet_log, ctypes.c_void_p(0))
    lc.llama_backend_init()


def physical_cores() -> int:
    """Physical cores available to this process (llama.cpp is slower on hyper-threads), at most its
    container's CPU limit (threads past the quota are throttled, not run)."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1
    cores: set[tuple[str, str]] = set()
    try:
        cpu = pkg = core = ""
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key, val = key.strip(), val.strip()
            if key == "processor":
                cpu = val
            elif key == "physical id":
                pkg = val
            elif key == "core id":
                core = val
                if cpu.isdigit() and int(cpu) in cpus:
                    cores.add((pkg, core))
    except OSError:
        pass
    return max(1, min(len(cores) or len(cpus), len(cpus), usable_cpus()))


@functools.cache
def amx_compiled() -> bool:
    """Whether the loaded llama.cpp library has its AMX matrix kernels compiled in (a native build on a
    CPU that reports AMX). They are reached only through llama.cpp's extra buffer types."""
    return "AMX_INT8 = 1" in lc.llama_print_system_info().decode("utf-8", "replace")


def load_model(model_path: Path, repack: bool, allow_amx: bool = False) -> lc.llama_model_p:
    """Load a GGUF file with memory-mapped weights. `repack`: llama.cpp's repacked CPU layout
    (use_extra_bufts): faster decoding, slower prompt processing of Q4_K weights on this project's
    AVX-512 test machine (docs/performance.md). When the library has AMX kernels and `allow_amx` is
    off, the extra buffer types stay off (they would route matrix products to AMX, which dies with
    SIGILL on virtual machines that report AMX without supporting it)."""
    init_backend()
    if repack and amx_compiled() and not allow_amx:
        logger.warning(
            "llama.cpp was built with AMX kernels: loading without repacked weights (DS_LLAMA_AMX=true "
            "allows AMX; a build without it keeps repacking: CFLAGS=$(bench/llama_build_flags.sh))"
        )
        repack = False
    params = lc.llama_model_default_params()  # memory-mapped weights (load mode "auto")
    params.use_extra_bufts = repack
    model = lc.llama_model_load_from_file(str(model_path).encode(), params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load the model file {model_path}")
    return model


def create_context(
    model: lc.llama_model_p, *, n_ctx: int, n_batch: int, n_seq_max: int, n_threads: int, flash_attn: bool
) -> lc.llama_context_p:
    """A context with one unified KV cache of `n_ctx` cells for `n_seq_max` sequence ids, and one
    ubatch of `n_batch` tokens per decode. Frees `model` when the context cannot be created."""
    params = lc.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = n_batch
    params.n_ubatch = n_batch  # one ubatch per step
    params.n_seq_max = n_seq_max
    params.n_threads = n_threads
    params.n_threads_batch = n_threads
    params.kv_unified = True
    params.no_perf = True
    params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = lc.llama_init_from_model(model, params)
    if not ctx:
        lc.llama_model_free(model)
        raise RuntimeError("llama.cpp could not create a context (out of memory for the KV cache?)")
    return ctx


def model_metadata(model: lc.llama_model_p, key: str) -> str | None:
    """One GGUF metadata value as text, or None when the file does not have it."""
    buf = ctypes.create_string_buffer(4096)
    n = lc.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", "replace") if n >= 0 else None


def model_chat_template(model: lc.llama_model_p) -> str | None:
    """The chat template the GGUF file carries, if any."""
    template = lc.llama_model_chat_template(model, None)
    return template.decode("utf-8") if template else None
