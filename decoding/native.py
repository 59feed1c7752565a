"""The engine's own C++ CPU kernels, built once per torch version with torch's extension builder.

The draft's int8 and int4 linears run on them (they may approximate: verification never
uses them), and so do the linears, norms and attention of decode/verify steps
(exact and batch-invariant, like every full-model kernel the engine uses), one
call for all layers where the layer layout allows. Models held in bfloat16 run on
them too where the CPU has AVX512-BF16 (bf16 weights, float32 activations). Where they cannot
be built (no compiler, no AVX2, not x86) the engine falls back to torch's own
kernels and logs why, once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from .paths import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
HEADERS = sorted(SOURCE.parent.glob("*.h"))  # included by SOURCE: copied beside it
_lock = threading.Lock()
_state: dict[str, Any] = {}


def cpu_kernels() -> Any | None:
    """``torch.ops.knn_ssd`` (``int8_linear``, ``int4_linear``, ``linear_f32``, ``linear_bf16``, ``rms_norm``,
    ``cached_attention``, ``silu_mul``, ``decoder_layers``, ``huge_pages``: copies of tensors in one block
    of 2 MiB pages, for weights every step streams), or None."""
    with _lock:
        if "ops" not in _state:
            _state["ops"] = _build()
        return _state["ops"]


def bf16_kernels() -> Any | None:
    """The kernels where they also run bfloat16 weights (``linear_bf16``: CPUs with AVX512-BF16), else None."""
    ops = cpu_kernels()
    return ops if ops is not None and ops.bf16_supported() else None


def transparent_huge_pages() -> str:
    """The OS's transparent huge page mode (``always``, ``madvise``, ``never``), or ``unknown``: under
    ``never`` the weights ``huge_pages`` places stay in 4 KiB pages."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else "unknown"


def release_free_memory() -> None:
    """Hand the C allocator's free heap pages back to the OS (glibc's ``malloc_trim``; a no-op elsewhere):
    weight copies freed at load stay resident otherwise (466 MiB of the default model's runner here)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _build() -> Any | None:
    if os.environ.get("KNN_SSD_NATIVE", "1").lower() in ("0", "false", "no", "off"):
        log.info("native CPU kernels disabled by KNN_SSD_NATIVE")
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        log.info("native CPU kernels need AVX2 (CPU capability %s): using torch's kernels", capability)
        return None
    from torch.utils import cpp_extension

    cflags = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp"]
    source = _source_copy(cache_root() / "kernels", f"torch-{torch.__version__}", cflags)
    build_dir = source.parent
    # torch's builder runs `ninja`; the venv's own copy (pip package ninja) is next to this interpreter.
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    try:
        cpp_extension.load(name="knn_ssd_kernels", sources=[str(source)], build_directory=str(build_dir),
                           extra_cflags=cflags,
                           # at::parallel_for is OpenMP inline code: without -fopenmp it runs on one thread.
                           # The process's libgomp.so.1 is torch's own (same soname), so one thread pool.
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except (RuntimeError, OSError, ImportError) as exc:  # no compiler / ninja: stay on torch's kernels
        log.warning("native CPU kernels unavailable (%s): using torch's kernels", str(exc).splitlines()[0])
        return None
    log.info("native CPU kernels ready (%s)", build_dir)
    return torch.ops.knn_ssd


def _source_copy(root: Path, prefix: str, cflags: list[str]) -> Path:
    """The kernel source copied into a build folder named by its content, the flags and the torch
    installation it builds against (once): checkouts and virtual environments sharing a cache each
    keep their own build instead of rebuilding each other's on every start (ninja rebuilds when the
    source's path or an include path changes) or overwriting it."""
    files = {path.name: path.read_bytes() for path in (SOURCE, *HEADERS)}
    key = b"".join(files.values()) + " ".join([*cflags, torch.__file__, sys.prefix]).encode()
    folder = root / f"{prefix}-{hashlib.sha256(key).hexdigest()[:12]}"
    for name, text in files.items():
        target = folder / name
        if not target.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{name}.{os.getpid()}"
            tmp.write_bytes(text)
            tmp.replace(target)  # atomic: a concurrent builder sees the whole file or none
    return folder / SOURCE.name
