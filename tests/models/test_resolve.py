"""DS_MODEL resolution: local files and folders, the packaged default, hub ids (offline, from a real
Hugging Face cache layout: no hub is reachable from these machines)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from deepseek_serve.models.resolve import (
    DEFAULT_MODEL_ID,
    ModelResolutionError,
    choose_gguf,
    classify_repo_files,
    default_model_path,
    parse_model_spec,
    resolve_model,
)


def test_empty_means_the_default_pack(tmp_path: Path) -> None:
    spec = parse_model_spec("")
    assert spec.kind == "default" and spec.pack == "qwen2.5-coder-0.5b-instruct"
    assert DEFAULT_MODEL_ID == "Qwen2.5-Coder-0.5B-Instruct"
    with pytest.raises(ModelResolutionError, match="model pull"):  # not pulled into this empty cache
        resolve_model("", cache_dir=tmp_path, download=False)


def test_packaged_smollm2_needs_no_download(tmp_path: Path) -> None:
    resolved = resolve_model("smollm2-135m-instruct", cache_dir=tmp_path, download=False)
    assert resolved.source == "pack" and resolved.format == "gguf"
    assert resolved.model_id == "SmolLM2-135M-Instruct"
    assert resolved.path == default_model_path() and resolved.path.stat().st_size > 50_000_000


def test_local_gguf_file_and_folder(tmp_path: Path) -> None:
    gguf = tmp_path / "m" / "tiny.Q4_0.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf), cache_dir=tmp_path).path == gguf
    folder = resolve_model(str(gguf.parent), cache_dir=tmp_path)
    assert folder.path == gguf and folder.model_id == "tiny.Q4_0"
    (gguf.parent / "tiny.Q8_0.gguf").write_bytes(b"GGUF")
    assert resolve_model(str(gguf.parent), cache_dir=tmp_path).path.name == "tiny.Q4_0.gguf"


def test_local_hf_folder(tmp_path: Path) -> None:
    ckpt = tmp_path / "deepseek-coder-1.3b-instruct"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    resolved = resolve_model(str(ckpt), cache_dir=tmp_path, served_name="coder")
    assert resolved.format == "hf" and resolved.path == ckpt and resolved.model_id == "coder"


def test_bad_values_explain_themselves(tmp_path: Path) -> None:
    with pytest.raises(ModelResolutionError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"), cache_dir=tmp_path)
    with pytest.raises(ModelResolutionError, match="neither"):
        resolve_model("not a model id!", cache_dir=tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelResolutionError, match=r"neither config\.json"):
        resolve_model(str(empty), cache_dir=tmp_path)
    with pytest.raises(ModelResolutionError, match="a file name is expected"):
        parse_model_spec("org/name:")


def test_hub_spec_parsing() -> None:
    spec = parse_model_spec("deepseek-ai/deepseek-coder-1.3b-instruct")
    assert spec.kind == "hub" and spec.repo_id == "deepseek-ai/deepseek-coder-1.3b-instruct" and spec.filename is None
    spec = parse_model_spec("TheBloke/deepseek-coder-1.3b-instruct-GGUF:deepseek-coder-1.3b-instruct.Q4_K_M.gguf")
    assert spec.repo_id == "TheBloke/deepseek-coder-1.3b-instruct-GGUF"
    assert spec.filename == "deepseek-coder-1.3b-instruct.Q4_K_M.gguf"


def test_repo_listing_classification() -> None:
    fmt, files = classify_repo_files(
        [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "README.md",
            "tokenizer_config.json",
            "pytorch_model.bin",
        ]
    )
    assert fmt == "hf" and "model.safetensors" in files and "pytorch_model.bin" not in files
    assert "README.md" not in files
    fmt, files = classify_repo_files(["a.Q8_0.gguf", "a.Q4_K_M.gguf", "a.f16.gguf", "README.md"])
    assert fmt == "gguf" and files == ["a.Q4_K_M.gguf"]
    assert choose_gguf(["m-Q8_0-00001-of-00002.gguf", "m-Q8_0-00002-of-00002.gguf"]) == "m-Q8_0-00001-of-00002.gguf"
    with pytest.raises(ModelResolutionError):
        classify_repo_files(["README.md"])


def _fake_hub_cache(cache: Path, repo: str, files: dict[str, bytes]) -> Path:
    """The on-disk layout huggingface_hub itself writes (models--org--name/{refs,snapshots})."""
    root = cache / f"models--{repo.replace('/', '--')}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(rev)
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    return snap


def test_hub_file_from_cache_without_network(tmp_path: Path) -> None:
    repo = "someone/tiny-GGUF"
    snap = _fake_hub_cache(tmp_path, repo, {"tiny.Q4_K_M.gguf": b"GGUF"})
    resolved = resolve_model(f"{repo}:tiny.Q4_K_M.gguf", cache_dir=tmp_path, download=False)
    assert resolved.path.resolve() == (snap / "tiny.Q4_K_M.gguf").resolve()
    assert resolved.model_id == repo and resolved.source == "huggingface"


def test_hub_checkpoint_from_cache_without_network(tmp_path: Path) -> None:
    repo = "deepseek-ai/deepseek-coder-1.3b-instruct"
    fixture = Path(__file__).resolve().parents[3] / "shared/fixtures/deepseek/deepseek-coder-1.3b-instruct"
    files = {p.name: p.read_bytes() for p in fixture.glob("*.json")} if fixture.is_dir() else {}
    files["config.json"] = b'{"architectures": ["LlamaForCausalLM"]}'
    snap = _fake_hub_cache(tmp_path, repo, files)
    resolved = resolve_model(repo, cache_dir=tmp_path, download=False)
    assert resolved.format == "hf" and resolved.path.resolve() == snap.resolve()


def test_unreachable_hub_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelResolutionError, match="could not fetch someone/absent"):
        resolve_model("someone/absent:file.gguf", cache_dir=tmp_path)
    shutil.rmtree(tmp_path, ignore_errors=True)
