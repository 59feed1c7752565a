"""One way to get a ready engine: load the model, build the runner (and its draft copies), wrap the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import native
from .engine import SpeculativeEngine
from .gguf_blocks import read_stored_tensors
from .loading import ModelInfo, ModelLoadError, gguf_file, load_model, load_weights, resolve_device
from .prefix_cache import PrefixCache
from .runner import ModelRunner


class ChatTemplateError(ValueError):
    """``--chat-template`` names a file that cannot be read."""


def read_chat_template(path: str) -> str:
    """The Jinja source of a ``--chat-template`` file."""
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ChatTemplateError(f"cannot read --chat-template {path}: {exc}") from exc


TARGETS = ("auto", "native", "exact")


def load_engine(model: str, device: str = "auto", dtype: str = "auto", *, target: str = "auto",
                draft_copies: bool = True, chat_template: str | None = None, max_model_len: int | None = None,
                prefix_cache_mb: float = 0.0) -> tuple[SpeculativeEngine, ModelInfo]:
    """The engine every command and the server decode with, and what was loaded.

    ``target`` is what plain decoding runs and verification checks: ``native`` reads a GGUF file's weights
    in their stored blocks; ``exact`` the weights dequantised (fp32, or bf16 where the model is converted
    to it). ``auto`` is native where it runs (a GGUF model on a CPU with the native kernels), else exact:
    measured end to end on Spec-Bench prompts the native target is the faster server on one stream and under
    load since its kernels read tiles of 16 output columns (docs/measurements.md).
    ``draft_copies`` False skips the quantised draft copies (commands that never draft); ``chat_template``
    is the path of a template replacing the model's own (read before the slow load, so a bad path fails
    fast); ``max_model_len`` caps the context; ``prefix_cache_mb`` > 0 turns on automatic prefix caching.
    """
    if target not in TARGETS:
        raise ModelLoadError(f"unknown target {target!r}; choose {', '.join(TARGETS)}")
    template = read_chat_template(chat_template) if chat_template else None
    path = native_target_file(model, device, target)
    hf_model, tokenizer, info = load_model(model, device, dtype, weights=path is None,
                                           skip_native_blocks=path is not None)
    if template is not None:
        tokenizer.chat_template = template
    stored = None
    if path is not None:  # the file's blocks, and from the converted copy only what is not in blocks
        stored = read_stored_tensors(path, hf_model)
        load_weights(hf_model, Path(info.source), {name for name, tensor in stored.items() if tensor.quantised})
    runner = ModelRunner(hf_model, int8_draft=draft_copies, int4_draft=draft_copies, stored=stored)
    if stored is not None:  # the file's tensors now live in the runner's own layout: give their copies back
        del stored
        native.release_free_memory()
    cache = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
    return SpeculativeEngine(runner, tokenizer, max_context=max_model_len, prefix_cache=cache), info


def load_engine_for(args: Any, **options: Any) -> tuple[SpeculativeEngine, ModelInfo]:
    """``load_engine`` with a command's ``--model``, ``--device``, ``--dtype`` and ``--target``."""
    return load_engine(args.model, args.device, args.dtype, target=args.target, **options)


def native_target_file(model: str, device: str = "auto", target: str = "auto") -> Path | None:
    """The GGUF file whose blocks the native target reads (None: the exact target)."""
    if target == "exact":
        return None
    path = gguf_file(model)
    if path is None or native.cpu_kernels() is None or resolve_device(device).type != "cpu":
        if target == "native":
            raise ModelLoadError("--target native needs a .gguf model on a CPU with the native kernels (AVX2 and a "
                                 "C++ compiler); use --target exact")
        return None
    return path
