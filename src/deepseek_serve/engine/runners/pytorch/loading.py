"""Load a Hugging Face checkpoint folder into `CausalLM`: build on the meta device, then assign
mmap'd safetensors (or `.bin`) tensors converted to the target dtype/device."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from deepseek_serve.engine.runners.pytorch.config import ModelArgs
from deepseek_serve.engine.runners.pytorch.modules import CausalLM, fuse_hf_state_dict


class CheckpointError(ValueError):
    """The folder is not a loadable checkpoint (no weights, missing or unexpected tensors)."""


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    files = sorted(path.glob("pytorch_model*.bin"))
    if files:
        return files
    raise CheckpointError(f"{path}: no *.safetensors or pytorch_model*.bin weights found")


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for f in _weight_files(path):
        if f.suffix == ".safetensors":
            state.update(load_file(str(f), device="cpu"))  # mmap'd
        else:
            state.update(torch.load(str(f), map_location="cpu", mmap=True, weights_only=True))
    return state


def load_model(path: Path, dtype: torch.dtype, device: torch.device) -> CausalLM:
    """Build the model from `path/config.json` and load its weights. Raises CheckpointError when
    tensors are missing or unexpected (rotary `inv_freq` buffers excepted)."""
    state = _read_state_dict(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: config.json is missing")
    return from_state_dict(ModelArgs.from_dir(path), state, dtype, device, str(path))


def from_state_dict(
    args: ModelArgs,
    state: dict[str, Tensor],
    dtype: torch.dtype,
    device: torch.device,
    origin: str = "state dict",
) -> CausalLM:
    """Assign Hugging Face-named tensors to a meta-built model (no copy when dtype/device already match)."""
    with torch.device("meta"):
        model = CausalLM(args)
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    try:
        state = fuse_hf_state_dict(state)
    except KeyError as exc:
        raise CheckpointError(f"{origin}: missing tensor {exc}") from None
    expected = {k for k in model.state_dict() if not (args.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise CheckpointError(
            f"{origin}: weights do not match {args.architecture} (missing: {sorted(missing)[:5]}, "
            f"unexpected: {sorted(unexpected)[:5]})"
        )
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().requires_grad_(False)
