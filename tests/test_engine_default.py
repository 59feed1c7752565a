"""Lossless greedy speculation on the default model (SmolLM2-135M-Instruct, fp32)."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import chat_ids

from decoding import (
    PLAIN,
    DraftPolicy,
    ModelRunner,
    PromptTooLongError,
    SamplingParams,
    SkipSet,
    SpeculativeEngine,
    load_model,
    native,
)

PROMPTS = [
    "Translate to English: Der Hund schläft unter dem Tisch.",
    "Summarize in one sentence: The town council voted to build a new library next to the park.",
    "What is the capital of Australia?",
    "A farmer has 12 cows and buys 7 more. How many cows does he have?",
    "Write a haiku about autumn rain.",
    "Explain photosynthesis to a ten-year-old.",
    "List three uses of copper.",
    "Who wrote the novel Pride and Prejudice?",
    "If a train travels 60 km in 45 minutes, what is its speed in km/h?",
    "Give me a recipe idea with lentils and spinach.",
    "Translate to English: Wir gehen morgen ins Kino.",
    "Why is the sky blue?",
    "Write a short motivational message for a student before an exam.",
    "What are the main differences between a virus and a bacterium?",
    "Based on this passage: 'The bridge opened in 1932 and carries six lanes.' When did the bridge open?",
    "Describe the water cycle in three steps.",
    "Compose a two-line poem about the sea.",
    "What is 15 percent of 240?",
    "Suggest a name for a coffee shop run by cats.",
    "How do vaccines train the immune system?",
]
SKIP_SETS = [SkipSet(attention=[5, 11], mlp=[20]), SkipSet(attention=[3, 8, 14, 22], mlp=[9, 17]),
             SkipSet(attention=[27], mlp=[2, 25, 28])]
POLICIES = [DraftPolicy(skip, precision=precision, threshold=0.5, max_draft=8)
            for skip, precision in itertools.product(SKIP_SETS, ("full", "int8", "int4"))]


def test_greedy_speculation_is_lossless_on_20_prompts(default_engine):
    """Each prompt runs plain and with one of the nine (skip set, precision) policies, in rotation."""
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    used = set()
    for i, text in enumerate(PROMPTS):
        ids = chat_ids(default_engine.tokenizer, text)
        plain = default_engine.run(ids, params, PLAIN).generated
        assert len(plain) == 64
        policy = POLICIES[i % len(POLICIES)]
        spec = default_engine.run(ids, params, policy)
        assert spec.generated == plain, f"prompt {i} diverged with {policy}"
        assert spec.stats.verify_steps < 64
        used.add(policy)
    assert len(used) == len(POLICIES)


@pytest.mark.skipif(native.bf16_kernels() is None, reason="bf16 kernels need an AVX512-BF16 CPU")
def test_bf16_greedy_speculation_is_exact_on_the_default_model():
    """In bfloat16 on an AVX512-BF16 CPU (native kernels, batch-invariant) speculation is exact too: every
    (skip set, precision) policy gives plain decoding's tokens, with no near-tie allowance."""
    hf_model, tokenizer, _ = load_model("default", device="cpu", dtype="bfloat16")
    engine = SpeculativeEngine(ModelRunner(hf_model, int8_draft=True), tokenizer)
    assert engine.runner.batch_invariant
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    for i, text in enumerate(PROMPTS[::3]):
        ids = chat_ids(tokenizer, text)
        plain = engine.run(ids, params, PLAIN).generated
        for policy in (POLICIES[i % len(POLICIES)], DraftPolicy(precision="int8", threshold=0.0, max_draft=12),
                       DraftPolicy(precision="int4", threshold=0.0, max_draft=12)):
            assert engine.run(ids, params, policy).generated == plain, f"prompt {i} diverged with {policy}"


def test_plain_equals_transformers_generate(default_model, default_engine):
    hf_model, tokenizer, _ = default_model
    params = SamplingParams(max_tokens=64)  # both stop at EOS
    for text in PROMPTS[:4]:
        ids = chat_ids(tokenizer, text)
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False)
        assert default_engine.run(ids, params, POLICIES[1]).generated == ref[0, len(ids):].tolist()


def test_finish_reasons_and_stats(default_engine):
    ids = chat_ids(default_engine.tokenizer, "Say hello.")
    seq = default_engine.run(ids, SamplingParams(max_tokens=200), POLICIES[1])
    assert seq.finish_reason == "stop" and seq.generated[-1] in default_engine.eos_ids
    assert "<|im_end|>" not in seq.text
    stats = seq.stats
    assert stats.prompt_tokens == len(ids) and stats.completion_tokens == len(seq.generated)
    assert 0 <= stats.accepted_tokens <= stats.draft_tokens
    assert stats.mean_accepted_tokens >= 1.0
    assert stats.prefill_s > 0 and stats.verify_s > 0
    seq = default_engine.run(ids, SamplingParams(max_tokens=5, ignore_eos=True), POLICIES[0])
    assert seq.finish_reason == "length" and len(seq.generated) == 5


def test_prompt_embedding_is_mean_of_final_hidden_states(default_model, default_engine):
    hf_model, tokenizer, _ = default_model
    ids = chat_ids(tokenizer, "What is the capital of Australia?")
    seq, _ = default_engine.start(ids, SamplingParams(max_tokens=1))
    with torch.no_grad():
        hidden = hf_model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(seq.embedding, hidden.mean(dim=0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs", [dict(max_tokens=0), dict(max_tokens=-1), dict(temperature=-1.0),
                                    dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2), dict(stop=("",))])
def test_bad_sampling_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_prompt_longer_than_context(default_engine):
    too_long = [100] * default_engine.max_context
    with pytest.raises(PromptTooLongError, match="context"):
        default_engine.run(too_long, SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="empty"):
        default_engine.run([], SamplingParams(max_tokens=1))


def test_bad_policies(default_engine):
    with pytest.raises(ValueError, match="out of range"):
        default_engine.run([1, 2, 3], SamplingParams(max_tokens=2), DraftPolicy(SkipSet(mlp=[30])))
    with pytest.raises(ValueError):
        DraftPolicy(precision="int3")
    with pytest.raises(ValueError):
        DraftPolicy(threshold=1.5)
    with pytest.raises(ValueError):
        SkipSet(attention=["1"])


def test_int8_draft_copy_only_where_it_pays():
    """CPUs run the int8 copy on an int8 kernel; CUDA would dequantise it every call (1.49x a full forward
    on an H100), so runners there make none and the server's built-in policy decodes plainly."""
    from decoding.linear import Int8Linear
    from server.state import fallback_policy

    assert Int8Linear.pays_on(torch.device("cpu"))
    assert not Int8Linear.pays_on(torch.device("cuda"))
    assert fallback_policy(("full",)) == PLAIN
    assert fallback_policy(("full", "int8", "int4")) == DraftPolicy(precision="int4", lookup=True)
