"""The engine on a CUDA GPU: the CPU suite's guarantees where torch's kernels run every forward.

Skipped without CUDA (CI has no GPU). ``tests/cuda_check.sh`` runs it on a GPU machine together
with the forward timings; ``KNN_SSD_CUDA_MODEL`` names the model (default: the embedded one).
torch's CUDA kernels are not batch-invariant, so a k-token verify may round a position's logits
differently from a one-token step: greedy outputs must then match plain decoding except at
near-ties (``decoding.divergence``; the tolerance is 0 in float32).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from conftest import chat_ids
from tiny_models import CONFIGS, tiny_model

from decoding import DEFAULT_MODEL, PLAIN, DraftPolicy, ModelRunner, SamplingParams, SkipSet, SpeculativeEngine
from decoding.batching import generate_batch
from decoding.benchmark import evenly_skipped
from decoding.divergence import divergence
from decoding.loading import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MODEL = os.environ.get("KNN_SSD_CUDA_MODEL", DEFAULT_MODEL)
TEXTS = ["Translate into French: The train leaves at eight and arrives before noon.",
         "Summarize in two sentences: Bees carry pollen between flowers, which lets plants make seeds.",
         "What is the boiling point of water at sea level, in Celsius and Fahrenheit?",
         "A shop sells pens at 3 dollars each. How much do 14 pens cost? Think step by step.",
         "Write a short poem about the sea at night.", "Explain what a hash table is to a new programmer.",
         "Give three tips for a job interview.", "Which planet is the largest in the solar system, and why?"]


@functools.cache
def engine(dtype: str) -> SpeculativeEngine:
    """The test model on the GPU in ``dtype`` (no quantised draft copy: none pays on CUDA)."""
    hf_model, tokenizer, _ = load_model(MODEL, device="cuda", dtype=dtype)
    return SpeculativeEngine(ModelRunner(hf_model, int8_draft=True), tokenizer)


def policies(num_layers: int) -> list[DraftPolicy]:
    return [DraftPolicy(evenly_skipped(num_layers, 0.25), max_draft=8),
            DraftPolicy(evenly_skipped(num_layers, 0.5), threshold=0.6, max_draft=4),
            DraftPolicy(evenly_skipped(num_layers, 0.25), threshold=0.3, max_draft=6),
            DraftPolicy(evenly_skipped(num_layers, 0.25), max_draft=8, lookup=True)]  # n-gram lookup first


def test_no_quantised_draft_copy_on_cuda():
    assert engine("float32").runner.draft_precisions == ("full",)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_speculation_matches_plain_but_at_near_ties(dtype):
    eng = engine(dtype)
    params = SamplingParams(max_tokens=40, ignore_eos=True)  # 40: both dtypes fit one short device call
    parted, compared, steps, tokens = [], 0, 0, 0
    for text in TEXTS:
        ids = chat_ids(eng.tokenizer, text)
        plain = eng.run(ids, params, PLAIN).generated
        for policy in policies(eng.runner.num_layers):
            spec = eng.run(ids, params, policy)
            compared += 1
            steps, tokens = steps + spec.stats.verify_steps, tokens + len(spec.generated)
            found = divergence(eng, ids, plain, spec.generated)
            if found is not None:
                parted.append({"text": text[:40], "policy": policy.to_dict(), **found})
    print(f"\n[cuda {dtype}] {compared - len(parted)}/{compared} identical, {tokens / steps:.2f} tokens per "
          f"verify step; divergences: {parted}")
    assert steps < tokens  # speculation happened
    assert all(d["near_tie"] for d in parted), parted


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_tiny_architectures_speculate_losslessly_on_cuda(family):
    model = tiny_model(family).cuda()
    eng = SpeculativeEngine(ModelRunner(model, int8_draft=True), engine("float32").tokenizer)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    gen = torch.Generator().manual_seed(1)
    for length in (20, 33):
        ids = torch.randint(3, 1000, (length,), generator=gen).tolist()
        plain = eng.run(ids, params, PLAIN).generated
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=24, min_new_tokens=24,
                                 do_sample=False)[0, len(ids):].tolist()
        assert plain == ref
        for policy in (DraftPolicy(SkipSet(attention=[1], mlp=[2]), max_draft=4), DraftPolicy(SkipSet(mlp=[0, 3]))):
            assert eng.run(ids, params, policy).generated == plain


def test_runner_forward_matches_transformers_on_cuda():
    eng = engine("float32")
    ids = chat_ids(eng.tokenizer, TEXTS[5])
    with torch.no_grad():
        ref = eng.runner.model(torch.tensor([ids], device="cuda")).logits[0].float()
    runner = eng.runner
    cache = runner.new_cache(len(ids) + 1)
    runner.forward(torch.tensor(ids[:20], device="cuda"), cache, 0)
    out = runner.forward(torch.tensor(ids[20:], device="cuda"), cache, 20, all_logits=True).logits
    torch.testing.assert_close(out, ref[20:], rtol=1e-3, atol=1e-3)


def test_batched_rows_equal_solo_on_cuda():
    eng = engine("float32")
    kinds = [PLAIN, *policies(eng.runner.num_layers)]
    requests = [(chat_ids(eng.tokenizer, text), SamplingParams(max_tokens=16 + 4 * i, ignore_eos=i % 2 == 0),
                 kinds[i % len(kinds)]) for i, text in enumerate(TEXTS)]
    solo = [eng.run(*request).generated for request in requests]
    batched = [seq.generated for seq in generate_batch(eng, requests, max_batch_size=4, max_batched_tokens=96)]
    differing = [i for i, (a, b) in enumerate(zip(batched, solo)) if a != b]
    parted = [divergence(eng, requests[i][0], solo[i], batched[i]) for i in differing]
    print(f"\n[cuda batch] {len(solo) - len(differing)}/{len(solo)} rows equal solo; divergences: {parted}")
    assert all(d is None or d["near_tie"] for d in parted), parted


@pytest.mark.parametrize("policy", [PLAIN, DraftPolicy(SkipSet([3, 9], [5, 11]), max_draft=6)], ids=["plain", "skip"])
def test_seeded_sampling_repeats_on_cuda(policy):
    eng = engine("bfloat16")
    ids = chat_ids(eng.tokenizer, TEXTS[4])
    params = SamplingParams(max_tokens=32, temperature=0.8, top_p=0.95, seed=7, ignore_eos=True)
    first = eng.run(ids, params, policy).generated
    assert eng.run(ids, params, policy).generated == first
    other = SamplingParams(max_tokens=32, temperature=0.8, top_p=0.95, seed=8, ignore_eos=True)
    assert eng.run(ids, other, policy).generated != first


def test_penalties_and_logprobs_on_cuda():
    """Penalties, a logit bias, logprobs and prompt logprobs run on the GPU: the log-probabilities come
    back aligned with the tokens. Whether speculation kept the penalised output is printed, not
    asserted (``divergence`` judges near-ties on unadjusted logits)."""
    eng = engine("float32")
    ids = chat_ids(eng.tokenizer, TEXTS[6])
    params = SamplingParams(max_tokens=24, ignore_eos=True, presence_penalty=0.6, frequency_penalty=0.4,
                            logit_bias=((ids[-1], -5.0),), logprobs=3, prompt_logprobs=1)
    outputs = list(eng.generate(ids, params, PLAIN))
    plain = [t for out in outputs for t in out.token_ids]
    spec = eng.run(ids, params, policies(eng.runner.num_layers)[0]).generated
    print(f"\n[cuda penalties] speculative equals plain: {spec == plain}")
    logprobs = [lp for out in outputs for lp in out.logprobs]
    assert [lp.token_id for lp in logprobs] == plain and all(lp.logprob <= 0 for lp in logprobs)
    prompt = outputs[0].prompt_logprobs
    assert [lp.token_id for lp in prompt] == ids and prompt[0].logprob is None
    assert all(lp.logprob <= 0 and len(lp.top) == 1 for lp in prompt[1:])


def test_attention_never_takes_cudnn_on_cuda():
    """cuDNN's SDPA kernel made bf16 decoding 4.4x slower on an H200 (``CUDA_SDPA_BACKENDS``): the
    runner's prefill and decode steps attend with the other kernels."""
    eng = engine("bfloat16")
    ids = chat_ids(eng.tokenizer, TEXTS[0])
    cache = eng.runner.new_cache(len(ids) + 3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        eng.runner.forward(torch.tensor(ids, device="cuda"), cache, 0)
        for i in range(3):
            eng.runner.forward(torch.tensor(ids[-1:], device="cuda"), cache, len(ids) + i)
    ops = {event.name for event in prof.events() if event.name.startswith("aten::_scaled_dot_product")}
    assert ops and not any("cudnn" in op for op in ops), ops
