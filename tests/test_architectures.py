"""The runner and the speculative loop on tiny Llama/Qwen2/Qwen3/Mistral/Gemma/Gemma2 models."""

from __future__ import annotations

import pytest
import torch
from tiny_models import CONFIGS, tiny_model

from decoding import PLAIN, DraftPolicy, ModelRunner, SamplingParams, SkipSet, SpeculativeEngine
from decoding.loading import check_architecture

POLICIES = [
    DraftPolicy(SkipSet(attention=[1], mlp=[2]), threshold=0.0, max_draft=4),
    DraftPolicy(SkipSet(attention=[0, 3], mlp=[]), threshold=0.3, max_draft=6),
    DraftPolicy(SkipSet(attention=[], mlp=[1, 2, 3]), threshold=0.5),
    DraftPolicy(SkipSet(), precision="int8", threshold=0.0, max_draft=5),
    DraftPolicy(SkipSet(attention=[2]), precision="int8", threshold=0.2, max_draft=3),
    DraftPolicy(SkipSet(mlp=[0]), precision="int4", threshold=0.0, max_draft=6),
]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, default_model):
    model = tiny_model(request.param)
    check_architecture(model)
    _, tokenizer, _ = default_model
    return model, SpeculativeEngine(ModelRunner(model), tokenizer)


def _prompts(n: int, length: int = 20) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, 1000, (length + i,), generator=gen).tolist() for i in range(n)]


def test_forward_matches_transformers(tiny):
    model, engine = tiny
    ids = _prompts(1, 40)[0]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    runner = engine.runner
    cache = runner.new_cache(64)
    runner.forward(torch.tensor(ids[:25]), cache, 0)  # prefix first, then the rest against the cache
    out = runner.forward(torch.tensor(ids[25:]), cache, 25, all_logits=True).logits
    torch.testing.assert_close(out, ref[25:], rtol=1e-4, atol=1e-4)


def _policy_id(p) -> str:
    return f"{p.precision}-a{sorted(p.skip.attention)}-m{sorted(p.skip.mlp)}"


@pytest.mark.parametrize("policy", POLICIES, ids=_policy_id)
def test_speculative_greedy_equals_plain_and_generate(tiny, policy):
    model, engine = tiny
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    for ids in _prompts(3):
        plain = engine.run(ids, params, PLAIN).generated
        spec = engine.run(ids, params, policy)
        assert spec.generated == plain
        assert spec.stats.verify_steps < len(plain)  # speculation really happened
        with torch.no_grad():  # transformers stops at EOS: compare with the engine doing the same
            ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
        assert engine.run(ids, SamplingParams(max_tokens=24), policy).generated == ref


def test_kv_cache_holds_only_full_model_entries(tiny):
    _, engine = tiny
    ids = _prompts(1)[0]
    seq, _ = engine.start(ids, SamplingParams(max_tokens=30, ignore_eos=True))
    seq.policy = POLICIES[1]
    while not seq.finished:
        engine.step(seq)
        assert seq.cache.length == len(seq.tokens) - 1  # every committed token but the newest
    runner = engine.runner
    fresh = runner.new_cache(seq.cache.capacity)
    runner.forward(torch.tensor(seq.tokens[:-1]), fresh, 0)
    n = seq.cache.length
    torch.testing.assert_close(seq.cache.keys[:, :, :, :n], fresh.keys[:, :, :, :n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seq.cache.values[:, :, :, :n], fresh.values[:, :, :, :n], rtol=1e-5, atol=1e-5)


def test_skip_indices_out_of_range(tiny):
    _, engine = tiny
    n = engine.runner.num_layers
    with pytest.raises(ValueError, match="out of range"):
        engine.run(_prompts(1)[0], SamplingParams(max_tokens=2), DraftPolicy(SkipSet(attention=[n])))
    with pytest.raises(ValueError, match="out of range"):
        SkipSet(mlp=[-1]).validate(n)
