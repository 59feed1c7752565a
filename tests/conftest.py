"""Shared fixtures: the default model is loaded once per test session."""

from __future__ import annotations

import pytest

from decoding import ModelRunner, SpeculativeEngine, load_model


@pytest.fixture(scope="session")
def default_model():
    """(hf_model, tokenizer, info) of the embedded default model, fp32 on CPU."""
    return load_model("default", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def default_engine(default_model) -> SpeculativeEngine:
    hf_model, tokenizer, _ = default_model
    return SpeculativeEngine(ModelRunner(hf_model, int8_draft=True), tokenizer)


@pytest.fixture(scope="session")
def tiny_engine(default_model) -> SpeculativeEngine:
    """A tiny random Llama (fast enough for sampling statistics) with the default model's tokenizer."""
    from tiny_models import tiny_model

    return SpeculativeEngine(ModelRunner(tiny_model("llama", seed=3)), default_model[1])


def chat_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a one-turn chat prompt."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The default server on the exact target: default model, shipped routing artifact, no API key; prompts
    logged to ``server.prompt_log``. Its tests compare answers with ``default_engine``'s (the exact target, in
    process); the default target (native for a .gguf model) has servers of its own in test_native_target."""
    from live_server import LiveServer

    prompt_log = tmp_path_factory.mktemp("prompt-log") / "prompts.jsonl"
    with LiveServer("--max-concurrency", "8", "--log-prompts", str(prompt_log), "--target", "exact") as live:
        live.prompt_log = prompt_log
        yield live
