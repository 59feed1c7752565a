"""Outputs of the native kernels that have both an AVX2 and an AVX-512 variant, saved to a file.

Run as ``python tests/isa_outputs.py OUT`` with and without ``KNN_SSD_AVX512=0``:
``test_native_kernels`` checks that both runs give the same bits.
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from decoding import ModelRunner, native


def outputs() -> dict[str, torch.Tensor]:
    """linear_f32 over 1-13 and 300 rows, int8_linear over 8 rows, the native target's block linears
    (k-quants and 32-input formats) over 1, 2 and 7 rows (row blocks of each size; VNNI's instructions where
    the CPU has them), and a model with 64-wide heads (the attention's 32-wide value chunks) through prefill
    and a 5-token verify, and its KV entries."""
    kernels = native.cpu_kernels()
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(200, 96, generator=gen), torch.randn(300, 96, generator=gen)
    packed = kernels.pack_f32(w)
    out = {f"linear_f32_{m}": kernels.linear_f32(x[:m], packed, None, 200) for m in (*range(1, 14), 300)}
    q = torch.randint(-127, 128, (70, 96), generator=gen, dtype=torch.int8)
    out["int8_linear_8"] = kernels.int8_linear(x[:8], q, torch.rand(70, generator=gen), None)
    for name, type_id, nbytes, scales_at, scales in (("q4_k", 12, 144, 0, 2), ("q5_k", 13, 176, 0, 2),
                                                     ("q6_k", 14, 210, 208, 1), ("q4_1", 3, 20, 0, 2),
                                                     ("q5_1", 7, 24, 0, 2), ("q8_0", 8, 34, 0, 1)):
        per_block = 256 if type_id >= 12 else 32
        blocks = torch.randint(0, 256, (40, 512 // per_block, nbytes), generator=gen, dtype=torch.uint8)
        blocks[..., scales_at:scales_at + 2 * scales] = torch.full((scales,), 0.01, dtype=torch.float16).view(
            torch.uint8)
        xk = torch.randn(7, 512, generator=gen)
        packed, parts = kernels.qblock_pack(blocks.reshape(-1), torch.tensor([[type_id, 40]]), 512)
        for m in (1, 2, 7):
            out[f"{name}_{m}"] = kernels.qblock_linear(xk[:m], packed, parts, None)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=320, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.2)
    runner = ModelRunner(AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval())
    cache = runner.new_cache(64)
    tokens = torch.randint(0, 512, (45,), generator=gen)
    out["prefill"] = runner.forward(tokens[:40], cache, 0, prefill=True).logits
    out["verify"] = runner.forward(tokens[40:], cache, 40, all_logits=True).logits
    out["keys"] = cache.keys[:, :, :, :45].clone()
    return out


if __name__ == "__main__":
    torch.save(outputs(), sys.argv[1])
