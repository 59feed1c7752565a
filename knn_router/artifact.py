"""The calibration artifact: router.json (labels, policies, report, fingerprint), anchors, hnswlib index.

No pickle: anchors are safetensors, the index is hnswlib's own format, and every
file's SHA-256 is recorded in router.json so corruption is caught at load time.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np
from safetensors.numpy import load_file, save_file

from decoding.loading import DEFAULT_MODEL
from decoding.policy import DraftPolicy

from .router import Router

FORMAT = "knn-ssd-router"
VERSION = 1
MANIFEST = "router.json"
ANCHORS = "anchors.safetensors"
INDEX = "index.hnsw"


class ArtifactError(ValueError):
    """A calibration artifact that is missing, corrupted or made for another model."""


# --model: the directory of the artifact calibrated on the exact target; the native target's is "<directory>-native"
SHIPPED_ARTIFACTS = {DEFAULT_MODEL: "smollm2-135m", "qwen2.5-coder-1.5b": "qwen2.5-coder-1.5b"}
TARGETS = ("native", "exact")


def default_artifact_dir(target: str = "native") -> Path:
    """The prebuilt artifact for the default model and ``target``, shipped inside the package."""
    return _shipped(DEFAULT_MODEL, target)


def artifact_dir(index: str, model: str, target: str) -> Path | None:
    """The artifact directory an ``--index`` value names: a path, ``auto`` (the one shipped for ``model``, the
    default or a packaged model, calibrated on ``target``; else None) or ``none`` (None). Each target has
    its own: the exact target's policies draft on quantised copies the native target does not make."""
    if index == "none":
        return None
    if index != "auto":
        return Path(index)
    return _shipped(model, target) if model in SHIPPED_ARTIFACTS else None


def _shipped(model: str, target: str) -> Path:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    suffix = "-native" if target == "native" else ""
    return Path(__file__).resolve().parent / "artifacts" / f"{SHIPPED_ARTIFACTS[model]}{suffix}"


def save_artifact(directory: Path, router: Router, anchors: np.ndarray, model: dict[str, Any],
                  report: dict[str, Any], target: str) -> None:
    """Write ``router`` (with its ``anchors``) and the calibration ``report`` to ``directory``; ``target`` is
    what the calibration decoded with (``native`` or ``exact``), recorded as the manifest's ``target``."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"anchors": np.ascontiguousarray(anchors, dtype=np.float32)}, str(directory / ANCHORS))
    router.index.save_index(str(directory / INDEX))
    manifest = {
        "format": FORMAT, "version": VERSION, "model": model, "target": target,
        "embedding": "mean over prompt positions of the final-norm last hidden state",
        "space": "cosine", "k": router.k, "threshold": router.threshold,
        "labels": router.labels,
        "policies": {name: p.to_dict() for name, p in sorted(router.policies.items())},
        "report": report,
        "files": {name: _sha256(directory / name) for name in (ANCHORS, INDEX)},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def load_router(directory: Path, fingerprint: str | None = None, k: int | None = None,
                threshold: float | None = None) -> Router:
    """Load and check an artifact; ``fingerprint`` must match the serving model's when given."""
    manifest = read_manifest(directory)
    made_for = manifest.get("model", {}).get("fingerprint")
    if fingerprint is not None and made_for != fingerprint:
        raise ArtifactError(f"{directory / MANIFEST}: made for model fingerprint {made_for}, but the loaded model's "
                            f"fingerprint is {fingerprint}; recalibrate with 'knn-ssd calibrate' for this model")
    for name, digest in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path}: file missing")
        if _sha256(path) != digest:
            raise ArtifactError(f"{path}: corrupted (SHA-256 does not match {MANIFEST})")
    try:
        anchors = load_file(str(directory / ANCHORS))["anchors"]
        labels = list(manifest["labels"])
        policies = {name: DraftPolicy.from_dict(p) for name, p in manifest["policies"].items()}
        index = hnswlib.Index(space="cosine", dim=anchors.shape[1])
        index.load_index(str(directory / INDEX), max_elements=max(len(labels), 16))
        return Router(anchors, labels, policies, k=k or int(manifest.get("k", 1)),
                      threshold=manifest.get("threshold", 0.0) if threshold is None else threshold, index=index)
    except (KeyError, ValueError, RuntimeError, OSError) as exc:
        raise ArtifactError(f"{directory}: invalid artifact: {exc}") from exc


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: file missing (not a knn-ssd calibration artifact)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise ArtifactError(f"{path}: corrupted (not valid JSON: {exc})") from exc
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ArtifactError(f"{path}: not a {FORMAT} v{VERSION} manifest")
    for key in ("labels", "policies", "files", "model"):
        if key not in manifest:
            raise ArtifactError(f"{path}: corrupted (missing '{key}')")
    return manifest


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
