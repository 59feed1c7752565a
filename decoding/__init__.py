"""Lossless self-speculative decoding: model loading, layer-skipping drafts, the decoding loop."""

from .engine import PromptTooLongError, Sequence, SpeculativeEngine, StepOutput
from .loading import DEFAULT_MODEL, ModelInfo, ModelLoadError, load_model
from .logprobs import MAX_TOP_LOGPROBS, TokenLogprob
from .policy import PLAIN, DraftPolicy, SkipSet
from .runner import ModelRunner
from .sampling import SamplingParams
from .stats import RequestStats, TokenSource

__all__ = [
    "DEFAULT_MODEL", "MAX_TOP_LOGPROBS", "PLAIN", "DraftPolicy", "ModelInfo", "ModelLoadError", "ModelRunner",
    "PromptTooLongError", "RequestStats", "SamplingParams", "Sequence", "SkipSet", "SpeculativeEngine", "StepOutput",
    "TokenLogprob", "TokenSource", "load_model",
]
