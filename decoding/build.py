"""One way to get a ready engine: load the model, build the runner (and its draft copies), wrap the engine."""

from __future__ import annotations

from pathlib import Path

from .engine import SpeculativeEngine
from .loading import ModelInfo, load_model
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


def load_engine(model: str, device: str = "auto", dtype: str = "auto", *, draft_copies: bool = True,
                chat_template: str | None = None, max_model_len: int | None = None,
                prefix_cache_mb: float = 0.0) -> tuple[SpeculativeEngine, ModelInfo]:
    """The engine every command and the server decode with, and what was loaded.

    ``draft_copies`` False skips the quantised draft copies (commands that never draft); ``chat_template``
    is the path of a template replacing the model's own (read before the slow load, so a bad path fails
    fast); ``max_model_len`` caps the context; ``prefix_cache_mb`` > 0 turns on automatic prefix caching.
    """
    template = read_chat_template(chat_template) if chat_template else None
    hf_model, tokenizer, info = load_model(model, device, dtype)
    if template is not None:
        tokenizer.chat_template = template
    runner = ModelRunner(hf_model, int8_draft=draft_copies, int4_draft=draft_copies)
    cache = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
    return SpeculativeEngine(runner, tokenizer, max_context=max_model_len, prefix_cache=cache), info
