"""The native target: GGUF blocks computed on as stored by the CPU kernels, against ggml's own dequantisation.

Kernel tests use random blocks of every supported GGML type (any bytes are valid blocks once their float16
scales are sane) and gguf-py's reference dequantisation; model tests quantise tiny models of every family
with gguf-py, so the exact target (the dequantised weights) and the native one (the blocks) hold the same
values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from tiny_models import CONFIGS, tiny_model

from decoding import PLAIN, DraftPolicy, ModelRunner, SamplingParams, SkipSet, SpeculativeEngine, native
from decoding.runner import Segment
from decoding.gguf_blocks import StoredTensor
from decoding.linear import BlockLinear

pytestmark = pytest.mark.skipif(native.cpu_kernels() is None, reason="the native target needs the CPU kernels")

# type: (inputs per block, bytes per block, offsets of its float16 scales)
BLOCKS = {Q.Q4_0: (32, 18, [0]), Q.Q4_1: (32, 20, [0, 2]), Q.Q5_0: (32, 22, [0]), Q.Q5_1: (32, 24, [0, 2]),
          Q.Q8_0: (32, 34, [0]), Q.Q4_K: (256, 144, [0, 2]), Q.Q5_K: (256, 176, [0, 2]), Q.Q6_K: (256, 210, [208])}
# The stated error, of the largest output: the 32-input formats quantise inputs to 16 bits per row (off by a
# few 1e-5; 2e-4 leaves room for unlucky rows); the k-quants to 8 bits per 256-input block, as llama.cpp does
# (up to ~1.2% on these random blocks and inputs, measured over seeds; 2.5e-2 leaves room).
MAX_RELATIVE_ERROR = {qtype: 2.5e-2 if per_block == 256 else 2e-4 for qtype, (per_block, _, _) in BLOCKS.items()}


def random_blocks(qtype: Q, rows: int, inputs: int, seed: int = 0) -> np.ndarray:
    """(rows, row bytes) random blocks of ``qtype`` with float16 scales in 0.001..0.02."""
    per_block, nbytes, scale_offsets = BLOCKS[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, inputs // per_block, nbytes), dtype=np.uint8)
    for offset in scale_offsets:
        scales = (rng.random((rows, inputs // per_block)) * 0.019 + 0.001).astype(np.float16)
        raw[:, :, offset:offset + 2] = scales.view(np.uint8).reshape(rows, inputs // per_block, 2)
    return raw.reshape(rows, -1)


def block_linear(parts: list[tuple[Q, np.ndarray]], inputs: int, bias: torch.Tensor | None = None) -> BlockLinear:
    return BlockLinear([(int(t), torch.from_numpy(blocks.copy())) for t, blocks in parts], inputs, bias)


@pytest.mark.parametrize("qtype", sorted(BLOCKS), ids=lambda t: t.name)
def test_block_kernel_matches_dequantised_reference(qtype):
    inputs = 512
    blocks = random_blocks(qtype, 70, inputs)
    weight = dequantize(blocks, qtype).astype(np.float64)
    bias = torch.randn(70)
    linear = block_linear([(qtype, blocks)], inputs, bias)
    x = torch.randn(9, inputs)
    out = linear(x)
    ref = x.double().numpy() @ weight.T + bias.double().numpy()
    assert np.abs(out.double().numpy() - ref).max() <= MAX_RELATIVE_ERROR[qtype] * np.abs(ref).max()
    # batch invariance: each row alone, and any split of the rows, gives the same bits
    assert torch.equal(torch.cat([linear(x[i:i + 1]) for i in range(9)]), out)
    assert torch.equal(torch.cat([linear(x[:2]), linear(x[2:7]), linear(x[7:])]), out)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda t: t.name)
def test_kquant_kernel_holds_the_largest_sums(qtype):
    """Every quantised value at its largest and every input at +-127 once quantised: the partial sums the
    kernels keep in int16 (AVX2, AVX-512 without VNNI) reach their bound here and must not wrap."""
    inputs = 512
    per_block, _, scale_offsets = BLOCKS[qtype]
    blocks = random_blocks(qtype, 24, inputs).reshape(24, inputs // per_block, -1)
    scales = {offset + i for offset in scale_offsets for i in (0, 1)}
    values = [i for i in range(blocks.shape[-1]) if i not in scales]
    blocks[..., values] = 0xFF
    blocks = blocks.reshape(24, -1)
    weight = dequantize(blocks, qtype).astype(np.float64)
    signs = torch.ones(inputs)
    signs[1::2] = -1
    x = torch.stack([torch.ones(inputs), -torch.ones(inputs), signs, torch.randn(inputs).sign()])
    out = block_linear([(qtype, blocks)], inputs)(x)
    ref = x.double().numpy() @ weight.T
    assert np.abs(out.double().numpy() - ref).max() <= MAX_RELATIVE_ERROR[qtype] * np.abs(ref).max()


@pytest.mark.parametrize("qtype", sorted(BLOCKS), ids=lambda t: t.name)
def test_embedding_rows_are_ggml_dequantisation(qtype):
    inputs = 256
    blocks = random_blocks(qtype, 40, inputs, seed=1)
    rows = native.cpu_kernels().qblock_rows(torch.from_numpy(blocks.reshape(-1).copy()), int(qtype), inputs,
                                            torch.tensor([7, 0, 39, 7]))
    assert np.array_equal(rows.numpy(), dequantize(blocks, qtype)[[7, 0, 39, 7]])


def test_fused_parts_of_different_types():
    """A fused weight whose parts differ in type (Q4_K_M's Q4_K query/key rows, Q6_K value rows)."""
    inputs = 256
    parts = [(Q.Q4_K, random_blocks(Q.Q4_K, 48, inputs)), (Q.Q6_K, random_blocks(Q.Q6_K, 16, inputs, seed=2)),
             (Q.Q8_0, random_blocks(Q.Q8_0, 8, inputs, seed=3))]
    fused = block_linear(parts, inputs)
    x = torch.randn(3, inputs)
    alone = torch.cat([block_linear([part], inputs)(x) for part in parts], dim=1)
    assert torch.equal(fused(x), alone)


def test_block_linear_bits_do_not_depend_on_threads_or_their_claims():
    """Threads claim a linear's tiles as they go (the memory serves the cores unevenly), so which thread computes a
    tile changes from call to call: every output keeps its bits, with one thread or two, in decoding, verify
    and prompt rows (600 rows: more than one input chunk, fixed shares)."""
    inputs = 512
    parts = [(Q.Q4_K, random_blocks(Q.Q4_K, 4000, inputs)), (Q.Q6_K, random_blocks(Q.Q6_K, 1000, inputs, seed=2)),
             (Q.Q4_1, random_blocks(Q.Q4_1, 600, inputs, seed=3))]
    fused = block_linear(parts, inputs)
    x = torch.randn(600, inputs)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = {m: fused(x[:m]) for m in (1, 3, 600)}
        torch.set_num_threads(2)
        for _ in range(5):
            for m, y in alone.items():
                assert torch.equal(fused(x[:m]), y)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- tiny models
TINY_TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


def quantised_copy(model: torch.nn.Module) -> dict[str, StoredTensor]:
    """Quantise ``model``'s linears and embedding in place (each to a type of ``TINY_TYPES`` in turn) and
    return the blocks keyed as ``gguf_blocks.read_stored_tensors`` keys a file's: after this the model holds
    exactly the blocks' dequantised values (the exact target)."""
    stored = {}
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    for i, (name, module) in enumerate(modules):
        if name == "lm_head" and module.weight is model.model.embed_tokens.weight:
            continue  # tied: the runner reads the embedding's blocks
        qtype = TINY_TYPES[i % len(TINY_TYPES)]
        weight = module.weight.detach().float().numpy()
        blocks = quantize(weight, qtype)
        module.weight.data = torch.from_numpy(dequantize(blocks, qtype)).to(module.weight.dtype)
        stored[f"{name}.weight"] = StoredTensor(int(qtype), qtype.name, torch.from_numpy(blocks.copy()),
                                                weight.shape[1])
    return stored


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def native_tiny(request, default_model):
    model = tiny_model(request.param)
    stored = quantised_copy(model)
    with torch.no_grad():
        reference = model(torch.tensor([_prompt(40)])).logits[0]
    runner = ModelRunner(model, stored=stored)
    return reference, SpeculativeEngine(runner, default_model[1])


def _prompt(length: int, seed: int = 1) -> list[int]:
    return torch.randint(3, 1000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_native_runner_reads_blocks_and_frees_the_widened_weights(native_tiny):
    _, engine = native_tiny
    runner = engine.runner
    assert runner.target == "native"
    assert all(isinstance(lin, BlockLinear) for lin in runner._full_linears)
    assert runner.model.model.layers[0].mlp.down_proj.weight.numel() == 0  # no widened copy left
    assert runner.draft_precisions == ("full",)  # a quantised draft copy would cost what the target does
    # float16 KV entries, as llama.cpp keeps them, where every layer attends with the native kernel
    native_attention = all(runner._native_attention(layer) for layer in runner.layers)
    assert runner.new_cache(8).keys.dtype == (torch.float16 if native_attention else torch.float32)


def test_native_forward_matches_transformers_on_dequantised_weights(native_tiny):
    reference, engine = native_tiny
    ids = _prompt(40)
    runner = engine.runner
    cache = runner.new_cache(64)
    runner.forward(torch.tensor(ids[:25]), cache, 0)
    out = runner.forward(torch.tensor(ids[25:]), cache, 25, all_logits=True).logits
    # the blocks' own values, with inputs rounded to 16 bits per row at each linear and KV entries to float16
    # (2^-11 relative): logits of magnitude ~3 stay within ~1.4e-2 of the float32 forward of the dequantised
    # weights on these random tiny models (within 5e-3 with float32 KV entries); a wrong block or head is O(1)
    torch.testing.assert_close(out, reference[25:], rtol=2e-2, atol=2e-2)


def test_native_prefill_is_chunk_invariant(native_tiny):
    _, engine = native_tiny
    runner, ids = engine.runner, _prompt(30, seed=4)
    if not runner.batch_invariant:  # Gemma2's softcapped and Qwen3's normed attention run on torch's SDPA
        pytest.skip("this family's attention runs on torch's kernels, not chunk-invariant on either target")
    whole, chunked = runner.new_cache(40), runner.new_cache(40)
    runner.forward(torch.tensor(ids), whole, 0, prefill=True)
    for start in range(0, 30, 7):
        runner.forward(torch.tensor(ids[start:start + 7]), chunked, start, prefill=True)
    assert torch.equal(whole.keys[:, :, :, :30], chunked.keys[:, :, :, :30])
    assert torch.equal(whole.values[:, :, :, :30], chunked.values[:, :, :, :30])


def test_native_stack_matches_the_kernels_one_by_one(native_tiny):
    """The native layer stack (one parallel region over all layers) gives the bits of the per-layer path, which
    calls each kernel alone: packed sequences of different lengths, with and without skipped sub-layers."""
    runner = native_tiny[1].runner
    if runner._full_stack is None:
        pytest.skip("this family's layers run one by one anyway")
    caches = [runner.new_cache(64) for _ in range(2)]
    for cache, start in zip(caches, (30, 9)):
        runner.forward(torch.arange(3, 3 + start), cache, 0, prefill=True)
    segments = [Segment(torch.tensor([5, 6, 7]), caches[0], 30, all_logits=True),
                Segment(torch.tensor([8]), caches[1], 9)]

    def run(policy):
        logits = [out.logits for out in runner.forward_packed(segments, policy)]
        return logits, [t[:, 0, :, :40].clone() for c in caches for t in (c.keys, c.values)]

    for policy in (None, DraftPolicy(SkipSet(attention=[1], mlp=[0, 3]))):
        stacked = run(policy)
        stack, runner._full_stack = runner._full_stack, None
        per_layer = run(policy)
        runner._full_stack = stack
        assert all(torch.equal(a, b) for a, b in zip(stacked[0] + stacked[1], per_layer[0] + per_layer[1])), policy


@pytest.mark.parametrize("policy", [DraftPolicy(SkipSet(attention=[1], mlp=[2]), threshold=0.0, max_draft=4),
                                    DraftPolicy(SkipSet(mlp=[0, 3]), max_draft=6, lookup=True)],
                         ids=["skip", "skip-lookup"])
def test_native_speculation_is_lossless(native_tiny, policy):
    _, engine = native_tiny
    greedy = SamplingParams(max_tokens=24, ignore_eos=True)
    seeded = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.8, seed=7)
    for seed in (1, 2, 3):
        ids = _prompt(20 + seed, seed)
        spec = engine.run(ids, greedy, policy)
        assert spec.generated == engine.run(ids, greedy, PLAIN).generated
        assert spec.stats.verify_steps < len(spec.generated)
        assert engine.run(ids, seeded, policy).generated == engine.run(ids, seeded, policy).generated


def test_default_model_native_target(default_model):
    """The shipped default model on the native target: its Q4_1 linears and Q8_0 head read in place, and
    speculation (skip-layer drafts, n-gram lookup) returns plain decoding's tokens."""
    from decoding.build import load_engine

    engine, info = load_engine("default", "cpu", "float32", target="native")
    runner = engine.runner
    types = {int(t) for lin in runner._full_linears for t, *_ in lin.parts.tolist()}
    assert types == {int(Q.Q4_1), int(Q.Q8_0)}
    chat = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Name three rivers in Europe."}],
                                                add_generation_prompt=True, tokenize=True, return_dict=False)
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    plain = engine.run(chat, params, PLAIN).generated
    for policy in (DraftPolicy(SkipSet(attention=[5, 12], mlp=[20, 25]), max_draft=6),
                   DraftPolicy(lookup=True)):
        assert engine.run(chat, params, policy).generated == plain


def test_native_server_answers_as_plain_decoding():
    """``serve`` with its default target (auto: native for the default model's .gguf on this CPU): says so at
    startup and in ``knn_ssd``, routes with the artifact calibrated on that target (lookup drafts, no policy
    asking for a quantised copy the target lacks); routed answers equal ``speculate: false`` ones."""
    from live_server import LiveServer
    from openai import OpenAI

    with LiveServer("--prefix-cache-mb", "0") as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        messages = [{"role": "user", "content": "Repeat this list twice: apples, pears, plums, figs, dates."}]
        routed = client.chat.completions.create(model="default", messages=messages, max_tokens=48, temperature=0)
        plain = client.chat.completions.create(model="default", messages=messages, max_tokens=48, temperature=0,
                                               extra_body={"speculate": False})
        assert routed.choices[0].message.content == plain.choices[0].message.content
        assert routed.model_extra["knn_ssd"]["target"] == plain.model_extra["knn_ssd"]["target"] == "native"
        assert routed.model_extra["knn_ssd"]["draft_precision"] in (None, "full")
        log = server.log_text()
        assert "target: native (the GGUF's blocks as stored, tiled once" in log
        assert "smollm2-135m-native, calibrated on the native target" in log
        assert "which this runner lacks" not in log
