"""Tiny randomly initialised decoder models of each supported family (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 49152  # the default tokenizer's vocabulary, so its tokenizer can decode tiny-model output
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              bos_token_id=1, eos_token_id=2, pad_token_id=2)

CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=24),
    "gemma": lambda: GemmaConfig(**COMMON, head_dim=16),
    "gemma2": lambda: Gemma2Config(**COMMON, head_dim=16, sliding_window=24),
}


def tiny_model(family: str, seed: int = 0):
    """A tiny fp32 model of ``family`` with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    config.initializer_range = 0.2  # larger weights: decisive logits instead of near-uniform ones
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
