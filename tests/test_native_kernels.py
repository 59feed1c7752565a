"""The draft's native CPU kernels (decoding/csrc) against torch references, and the fallback without them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import CONFIGS, tiny_model
from transformers import AutoModelForCausalLM

from decoding import PLAIN, DraftPolicy, ModelRunner, SamplingParams, SkipSet, SpeculativeEngine, native
from decoding.linear import Int4Linear, Int8Linear
from decoding.runner import Segment
from decoding.sampling import greedy_tokens

KERNELS = native.cpu_kernels()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason="native kernels need an AVX2 CPU and a C++ compiler")
needs_bf16 = pytest.mark.skipif(native.bf16_kernels() is None, reason="bf16 kernels need an AVX512-BF16 CPU")


def _quantised(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    scale = w.abs().amax(dim=1) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale, torch.randn(n, generator=gen)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 9])
@pytest.mark.parametrize("k", [576, 1536, 100, 5000])
def test_int8_linear_matches_dequantised_matmul(rows, k):
    q, scale, bias = _quantised(37, k)
    x = torch.randn(rows, k) * torch.linspace(0.1, 8, k)  # a spread of magnitudes, like activations
    ref = F.linear(x, q.float() * scale[:, None], bias)
    out = KERNELS.int8_linear(x, q, scale, bias)
    # int16 activations: error bounded by half a quantisation step per input times the weights' mass
    bound = (x.abs().amax(dim=1, keepdim=True) / 32767 / 2) * (q.float().abs() * scale[:, None]).sum(dim=1)
    assert ((out - ref).abs() <= bound + 1e-5).all()


@needs_kernels
def test_int8_linear_rows_are_batch_invariant():
    q, scale, _ = _quantised(64, 576)
    x = torch.randn(9, 576)
    together = KERNELS.int8_linear(x, q, scale, None)
    for i in range(9):
        assert torch.equal(KERNELS.int8_linear(x[i:i + 1], q, scale, None)[0], together[i])


@needs_kernels
@pytest.mark.parametrize("n,k", [(37, 576), (64, 100), (9, 1536), (130, 7)])  # padded groups, odd widths
def test_linear_f32_matches_torch_and_is_row_invariant(n, k):
    """float32 weights packed by pack_f32: one FMA chain per output, so close to the float64 product and the
    same bits for a row whatever rows come with it (decode, verify, prefill chunks)."""
    gen = torch.Generator().manual_seed(n)
    w, bias, x = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen), torch.randn(25, k, generator=gen)
    packed = KERNELS.pack_f32(w)
    assert packed.shape == ((n + 31) // 32, k, 32)
    together = KERNELS.linear_f32(x, packed, bias, n)
    ref = F.linear(x.double(), w.double(), bias.double())
    bound = k * 2**-24 * (x.double().abs() @ w.double().abs().T) + 1e-6  # k float32 roundings of the magnitudes
    assert ((together.double() - ref).abs() <= bound).all()
    for rows in range(1, 25):  # every blocking of the rows gives the same bits per row
        assert torch.equal(KERNELS.linear_f32(x[:rows], packed, bias, n), together[:rows])
    assert torch.equal(KERNELS.linear_f32(x[7:8], packed, None, n) + bias, together[7:8])  # the bias is added last
    long = torch.randn(700, k, generator=gen)  # prefill-sized: row chunks, same arithmetic
    assert torch.equal(KERNELS.linear_f32(long, packed, bias, n)[650:659],
                       KERNELS.linear_f32(long[650:659], packed, bias, n))
    with pytest.raises(RuntimeError, match="pack_f32's layout"):
        KERNELS.linear_f32(x, packed, bias, n + 64)


@needs_kernels
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="needs an AVX-512 CPU")
def test_avx2_and_avx512_variants_give_the_same_bits(tmp_path):
    """The kernels with an AVX-512 variant (linear_f32, int8 drafts of 3+ rows, the attention's value mix,
    the native target's k-quant linears) give the AVX2 variant's bits, so output never depends on the CPU's
    vector width."""
    script = Path(__file__).with_name("isa_outputs.py")
    runs = {}
    for name, avx512 in (("avx512", "1"), ("avx2", "0")):
        env = {**os.environ, "KNN_SSD_AVX512": avx512, "PYTHONPATH": str(script.parent.parent)}
        subprocess.run([sys.executable, str(script), str(tmp_path / name)], env=env, check=True, timeout=300)
        runs[name] = torch.load(tmp_path / name)
    assert runs["avx512"].keys() == runs["avx2"].keys()
    for key, value in runs["avx512"].items():
        assert torch.equal(value, runs["avx2"][key]), key


@needs_kernels
def test_rms_norm_and_silu_mul_match_torch():
    x, w = torch.randn(5, 576) * 3, torch.rand(576) + 0.5
    torch.testing.assert_close(KERNELS.rms_norm(x, w, 1e-5), F.rms_norm(x, (576,), w, 1e-5), rtol=1e-5, atol=1e-5)
    g = torch.randn(3, 2 * 100) * 4  # 100: eight-wide blocks and a scalar tail
    g[0, :4] = torch.tensor([-100.0, 100.0, -88.5, 90.0])  # far tails of the sigmoid
    torch.testing.assert_close(KERNELS.silu_mul(g), F.silu(g[:, :100]) * g[:, 100:], rtol=1e-5, atol=1e-6)


@needs_kernels
def test_huge_pages_copies_tensors_into_one_block():
    ts = [torch.randn(3, 5), torch.arange(7, dtype=torch.int8), torch.randn(600, 1024).to(torch.bfloat16),
          torch.randn(4, 6).t()]  # odd sizes, several dtypes, a non-contiguous input
    out = KERNELS.huge_pages(ts)
    for t, o in zip(ts, out):
        assert o.dtype == t.dtype and o.shape == t.shape and o.is_contiguous() and torch.equal(o, t)
    assert len({o.untyped_storage().data_ptr() for o in out}) == 1  # one block
    out[0].zero_()
    assert all(torch.equal(o, t) for t, o in zip(ts[1:], out[1:]))  # no overlap


@needs_kernels
def test_runner_weights_live_in_one_block(default_engine):
    runner = default_engine.runner
    blocks = {lin.kernel_weight.untyped_storage().data_ptr() for lin in runner._full_linears}
    drafts = {q.qweight.untyped_storage().data_ptr() for layer in runner.layers for q in layer.drafts["int8"].values()}
    assert len(blocks) == 1 and len(drafts) == 1


@needs_kernels
@pytest.mark.parametrize("n", [1, 7, 8, 33, 49152])
def test_argmax_rows_matches_torch_argmax(n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(6, n, generator=gen)
    x[1] = 0.5  # a tie over the whole row: the first index
    x[2, -1] = 1e9  # the maximum at the very end
    x[3, n // 2] = float("nan")  # a NaN wins, like torch's
    x[4] = float("-inf")
    x[5, 0] = float("inf")
    assert torch.equal(KERNELS.argmax_rows(x), x.argmax(dim=-1))
    assert greedy_tokens(x) == x.argmax(dim=-1).tolist() and greedy_tokens(x[2]) == [int(x[2].argmax())]


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _attention_case(seed: int, t: int, start: int, hq: int = 6, hkv: int = 2, d: int = 16, cap: int = 40,
                    kv_dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    keys, values = (torch.randn(hkv, cap, d, generator=gen).to(kv_dtype) for _ in range(2))
    qkv = torch.randn(t, hq + 2 * hkv, d, generator=gen)
    angles = torch.rand(t, d // 2, generator=gen) * 6
    cos, sin = torch.cat((angles.cos(), angles.cos()), -1), torch.cat((angles.sin(), angles.sin()), -1)
    return keys, values, qkv, cos, sin


@needs_kernels
# bf16: the KV cache of bf16 models; float16: the native target's
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("d", [16, 12, 64])  # 12: a head size off the 8-wide vector path; 64: 32-wide chunks
def test_cached_attention_matches_sdpa(window, d, kv_dtype):
    hq, hkv, start, t = 6, 2, 11, 3
    keys, values, qkv, cos, sin = _attention_case(2, t, start, d=d, kv_dtype=kv_dtype)
    old_keys, old_values = keys.clone(), values.clone()
    out = KERNELS.cached_attention(qkv, cos, sin, [keys], [values], [start], [t], hq, 0.25, window)

    q = _rotary(qkv[:, :hq], cos[:, None], sin[:, None])
    ref_keys, ref_values = old_keys.clone(), old_values.clone()
    # rotary bit-identical to torch's (no fused multiply-add), then rounded as torch rounds to the buffers' dtype
    ref_keys[:, start:start + t] = _rotary(qkv[:, hq:hq + hkv], cos[:, None], sin[:, None]).transpose(0, 1)
    ref_values[:, start:start + t] = qkv[:, hq + hkv:].transpose(0, 1)
    assert torch.equal(keys, ref_keys)
    assert torch.equal(values, ref_values)
    qpos, kpos = torch.arange(start, start + t)[:, None], torch.arange(start + t)[None]
    mask = (kpos <= qpos) & ((kpos > qpos - window) if window else True)
    ref = F.scaled_dot_product_attention(q.transpose(0, 1)[None], ref_keys[None, :, :start + t].float(),
                                         ref_values[None, :, :start + t].float(), attn_mask=mask, scale=0.25,
                                         enable_gqa=True)[0].transpose(0, 1).reshape(t, -1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_cached_attention_rejects_mixed_kv_dtypes():
    keys, values, qkv, cos, sin = _attention_case(2, 1, 3)
    with pytest.raises(RuntimeError, match="all of one type"):
        KERNELS.cached_attention(qkv, cos, sin, [keys], [values.bfloat16()], [3], [1], 6, 0.25, 0)


@needs_kernels
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cached_attention_is_batch_and_length_invariant(kv_dtype):
    """A token's output is the same alone, among a verify step's tokens, or packed with other sequences."""
    cases = [_attention_case(seed, t, start, kv_dtype=kv_dtype)
             for seed, t, start in ((3, 4, 7), (4, 1, 20), (5, 2, 0))]
    packed_buffers = [(k.clone(), v.clone()) for k, v, *_ in cases]
    packed = KERNELS.cached_attention(torch.cat([c[2] for c in cases]), torch.cat([c[3] for c in cases]),
                                      torch.cat([c[4] for c in cases]), [k for k, _ in packed_buffers],
                                      [v for _, v in packed_buffers], [7, 20, 0], [4, 1, 2], 6, 0.25, 0)
    row = 0
    for (keys, values, qkv, cos, sin), start in zip(cases, (7, 20, 0)):
        for t in range(qkv.shape[0]):  # one token at a time, as plain decoding does
            alone = KERNELS.cached_attention(qkv[t:t + 1], cos[t:t + 1], sin[t:t + 1], [keys], [values],
                                             [start + t], [1], 6, 0.25, 0)
            assert torch.equal(alone[0], packed[row])
            row += 1


@needs_bf16
@pytest.mark.parametrize("n,k", [(37, 576), (70, 96), (9, 1536), (5, 32), (128, 64)])
def test_linear_bf16_matches_torch_and_is_row_invariant(n, k):
    """bf16 weights (packed by pack_bf16) times float32 inputs rounded to bf16, summed in float32: close to
    the float64 product of the rounded values, and the same bits for a row whatever rows come with it."""
    gen = torch.Generator().manual_seed(n)
    w, bias = torch.randn(n, k, generator=gen).bfloat16(), torch.randn(n, generator=gen)
    packed = KERNELS.pack_bf16(w)
    assert packed.shape == ((n + 31) // 32, k // 2, 32, 2)
    x = torch.randn(13, k, generator=gen) * 4  # 13 rows: two blocks of at most 12 (AVX-512)
    together = KERNELS.linear_bf16(x, packed, bias, n)
    ref = F.linear(x.bfloat16().double(), w.double(), bias.double())
    # one float32 chain per output over k / 2 input pairs: error within k float32 roundings of the magnitudes
    bound = k * 2**-24 * (x.bfloat16().double().abs() @ w.double().abs().T) + 1e-6
    assert ((together.double() - ref).abs() <= bound).all()
    for rows in range(1, 14):
        assert torch.equal(KERNELS.linear_bf16(x[:rows], packed, bias, n), together[:rows])
    assert torch.equal(KERNELS.linear_bf16(x[7:8], packed, None, n) + bias, together[7:8])
    long = torch.randn(700, k, generator=gen)  # prefill-sized: row chunks, same arithmetic
    assert torch.equal(KERNELS.linear_bf16(long, packed, bias, n)[650:659],
                       KERNELS.linear_bf16(long[650:659], packed, bias, n))
    with pytest.raises(RuntimeError, match="multiple of 32"):
        KERNELS.pack_bf16(torch.randn(n, k + 1).bfloat16())
    with pytest.raises(RuntimeError, match="pack_bf16's layout"):
        KERNELS.linear_bf16(x, packed, bias, n + 64)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)])
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])  # qwen2: biases; mistral: sliding window
def test_one_call_layer_stack_matches_per_layer_path(family, dtype):
    """Decode/verify steps and drafts run all layers in one native call; logits and KV writes are
    bit-identical to the per-layer path, for packed sequences and with skipped sub-layers."""
    runner = ModelRunner(tiny_model(family).to(dtype))
    assert runner._full_stack is not None and None not in runner._draft_stacks.values()
    assert "full-model forwards, int8 drafts and int4 drafts in one call" in runner.kernel_summary
    caches = [runner.new_cache(64) for _ in range(2)]
    for cache, start in zip(caches, (30, 9)):
        runner.forward(torch.arange(3, 3 + start), cache, 0)
    segments = [Segment(torch.tensor([5, 6, 7]), caches[0], 30, all_logits=True),
                Segment(torch.tensor([8]), caches[1], 9)]
    policies = [None, DraftPolicy(precision="int8"), DraftPolicy(SkipSet([1], [0, 3]), precision="int8"),
                DraftPolicy(SkipSet([2], [1])), DraftPolicy(SkipSet([0], [2]), precision="int4")]

    def run(policy):
        logits = [out.logits for out in runner.forward_packed(segments, policy)]
        return logits, [(c.keys[:, 0, :, :40].clone(), c.values[:, 0, :, :40].clone()) for c in caches]

    for policy in policies:
        stacked = run(policy)
        stacks = runner._full_stack, dict(runner._draft_stacks)
        runner._full_stack, runner._draft_stacks = None, dict.fromkeys(stacks[1])
        per_layer = run(policy)
        runner._full_stack, runner._draft_stacks = stacks
        assert all(torch.equal(a, b) for a, b in zip(stacked[0], per_layer[0])), policy
        assert all(torch.equal(a, b) for pair_a, pair_b in zip(stacked[1], per_layer[1])
                   for a, b in zip(pair_a, pair_b)), policy


def test_gemma_layers_keep_the_per_layer_path():
    """Layouts the one-call stack does not cover (extra norms, softcaps) are left to the per-layer path."""
    runner = ModelRunner(tiny_model("gemma2"))
    assert runner._full_stack is None and runner.kernel_summary.endswith("one call per layer")


def test_without_native_kernels_speculation_is_still_lossless(default_model, monkeypatch):
    """Where the kernels cannot be built, drafts run on torch's kernels and output is unchanged."""
    monkeypatch.setitem(native._state, "ops", None)
    runner = ModelRunner(tiny_model("llama"))
    assert runner.kernels is None
    assert runner.layers[0].drafts["int8"]["qkv"]._native is None
    assert runner.draft_precisions == ("full", "int8")  # the 4-bit copy exists only on the native kernel
    engine = SpeculativeEngine(runner, default_model[1])
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    ids = list(range(5, 30))
    plain = engine.run(ids, params, PLAIN).generated
    for policy in (DraftPolicy(precision="int8", threshold=0.0), DraftPolicy(SkipSet([1], [2]), threshold=0.0)):
        assert engine.run(ids, params, policy).generated == plain


def test_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("KNN_SSD_NATIVE", "0")
    assert native._build() is None


@needs_kernels
@pytest.mark.parametrize("n,k", [(37, 576), (9, 1536), (5, 32)])
def test_int4_linear_matches_its_dequantised_weights_and_is_row_invariant(n, k):
    gen = torch.Generator().manual_seed(k)
    w = torch.randn(n, k, generator=gen) * torch.linspace(0.01, 0.2, k)  # groups of different ranges
    lin = Int4Linear(w, torch.randn(n, generator=gen))
    dequantised = lin.dequantised()
    step = lin.scale[0].float().repeat_interleave(Int4Linear.GROUP, dim=1)
    assert ((dequantised - w).abs() <= step / 2 + 1e-3 * step + 1e-6).all()  # round to nearest on the group grid
    again = Int4Linear(dequantised, lin.bias)  # weights already on a 4-bit grid (GGUF Q4) come back as they were
    assert torch.equal(again.qweight, lin.qweight) and torch.equal(again.scale, lin.scale)
    x = torch.randn(9, k, generator=gen) * torch.linspace(0.1, 8, k)
    together = lin(x)
    ref = F.linear(x.double(), dequantised.double(), lin.bias.double())
    # int16 activations: error bounded by half a quantisation step per input times the weights' mass
    bound = (x.abs().amax(dim=1, keepdim=True) / 32767 / 2) * dequantised.abs().sum(dim=1)
    assert ((together - ref).abs() <= bound + 1e-4).all()
    for rows in (1, 2, 3, 4, 5):
        assert torch.equal(lin(x[:rows]), together[:rows])


@needs_kernels
def test_int4_copy_needs_input_widths_in_groups_of_32():
    with pytest.raises(ValueError, match="multiples of 32"):
        Int4Linear(torch.randn(8, 48))
    config = CONFIGS["llama"]()
    config.hidden_size, config.head_dim = 48, 12
    runner = ModelRunner(AutoModelForCausalLM.from_config(config).eval())
    assert runner.draft_precisions == ("full", "int8")
    with pytest.raises(ValueError, match="without the int4 copy"):
        runner.forward(torch.tensor([3]), runner.new_cache(8), 0, policy=DraftPolicy(precision="int4"))


@needs_kernels
def test_int8_linear_uses_native_kernel_on_cpu():
    q = Int8Linear(torch.randn(32, 64))
    assert q._native is not None and q.scale.dtype == torch.float32
    x = torch.randn(2, 64)
    torch.testing.assert_close(q(x), F.linear(x, q.qweight.float() * q.scale[:, None]), rtol=1e-3, atol=1e-3)


@needs_bf16
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
def test_bf16_model_runs_native_and_speculation_is_exact(family, default_model):
    """A bfloat16 model on an AVX512-BF16 CPU runs the native kernels on float32 activations: a k-token verify
    rounds like one-token steps, so greedy speculation gives exactly plain decoding's tokens (no near-ties)."""
    runner = ModelRunner(tiny_model(family).to(torch.bfloat16))
    assert runner.kernels is not None and runner.act_dtype == torch.float32 and runner.batch_invariant
    assert runner.new_cache(8).keys.dtype == torch.bfloat16  # the native attention writes bf16 KV entries
    engine = SpeculativeEngine(runner, default_model[1])
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    for ids in (list(range(5, 30)), list(range(300, 340, 3))):
        plain = engine.run(ids, params, PLAIN).generated
        for policy in (DraftPolicy(precision="int8", threshold=0.0), DraftPolicy(SkipSet([1], [2]), threshold=0.0),
                       DraftPolicy(SkipSet([0, 3], [1]), precision="int8", threshold=0.0),
                       DraftPolicy(precision="int4", threshold=0.0)):
            assert engine.run(ids, params, policy).generated == plain, policy


@needs_bf16
def test_bf16_layers_off_the_kernel_still_run():
    """Linears whose input width is no multiple of 32 fall back to torch in bf16 inside a native runner."""
    torch.manual_seed(0)
    config = CONFIGS["llama"]()
    config.hidden_size, config.head_dim = 48, 12
    runner = ModelRunner(AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval())
    assert runner.kernels is not None and not runner.layers[0].qkv.native and runner.layers[0].down.native
    assert not runner.batch_invariant and runner._full_stack is None
    out = runner.forward(torch.arange(3, 12), runner.new_cache(16), 0, prefill=True)
    assert torch.isfinite(out.logits).all()
    assert torch.isfinite(runner.forward(torch.tensor([4, 5]), runner.new_cache(16), 0, all_logits=True).logits).all()


def test_bf16_model_without_bf16_kernels_keeps_torch_path(monkeypatch):
    """Where the CPU has no AVX512-BF16, a bf16 model runs torch's kernels in bf16 (not batch-invariant)."""
    monkeypatch.setattr(native, "bf16_kernels", lambda: None)
    runner = ModelRunner(tiny_model("llama").to(torch.bfloat16))
    assert runner.kernels is None and runner.act_dtype == torch.bfloat16 and not runner.batch_invariant
    out = runner.forward(torch.arange(3, 12), runner.new_cache(16), 0)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()


def test_kernel_builds_are_keyed_by_source_flags_and_torch(tmp_path):
    """Checkouts and environments sharing a cache keep separate builds instead of rebuilding each other's."""
    from decoding.native import SOURCE, _source_copy

    first = _source_copy(tmp_path, "torch-x", ["-O3"])
    assert first.read_bytes() == SOURCE.read_bytes() and first.parent.parent == tmp_path
    mtime = first.stat().st_mtime_ns
    assert _source_copy(tmp_path, "torch-x", ["-O3"]) == first and first.stat().st_mtime_ns == mtime  # untouched
    assert _source_copy(tmp_path, "torch-x", ["-O2"]).parent != first.parent
