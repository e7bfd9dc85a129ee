"""The architecture of a Hugging Face checkpoint, read from its `config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not implemented by this runner."""


@dataclass(frozen=True)
class ModelArgs:
    """The architecture fields of a Hugging Face `config.json` that change the computation."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_linear_factor: float  # 1.0 = no scaling; positions are divided by it ("linear" rope_scaling)
    max_position_embeddings: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        archs = cfg.get("architectures") or []
        arch = (
            archs[0]
            if archs
            else {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(
                str(cfg.get("model_type")), str(cfg.get("model_type"))
            )
        )
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {arch!r} is not supported by the torch runner (supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {cfg.get('hidden_act')!r} is not supported (only silu)")
        if cfg.get("use_sliding_window"):
            raise UnsupportedModelError("sliding-window attention is not supported")
        # transformers < 5 writes `rope_scaling` + `rope_theta`; 5.x writes `rope_parameters`.
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        factor = float(rope.get("factor") or scaling.get("factor") or 1.0)
        if rope_type not in ("default", "linear"):
            raise UnsupportedModelError(f"rope type {rope_type!r} is not supported (default, linear)")
        if rope_type == "default":
            factor = 1.0
        theta = float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        is_qwen2 = arch == "Qwen2ForCausalLM"
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_linear_factor=factor,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            qkv_bias=is_qwen2 or bool(cfg.get("attention_bias", False)),
            o_bias=(not is_qwen2) and bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_dir(cls, path: Path) -> ModelArgs:
        return cls.from_config(json.loads((path / "config.json").read_text(encoding="utf-8")))

    @property
    def num_params(self) -> int:
        d, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        per_layer = attn + 3 * d * i + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + d
