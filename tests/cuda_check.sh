#!/usr/bin/env bash
# The GPU check, run from the repository root on a machine with a CUDA GPU:
#   tests/cuda_check.sh [MODEL] [SPEC_BENCH_JSONL] [OUT_DIR]
# 1. tests/test_cuda.py: greedy speculation (layer-skip drafts, one with n-gram lookup first) = plain
#    decoding (but at near-ties) in float32 and bfloat16, tiny Llama/Qwen2/Qwen3/Mistral/Gemma/Gemma2
#    configs, batching = solo, seeded sampling.
# 2. bench-decode in float32 and bfloat16: forward latencies (1-token, k-token verify, drafts) and plain
#    vs speculative tokens/s with a draft skipping a quarter of the sub-layers (no quantised copy on CUDA).
# 3. Forward latencies of a 1.5B-shaped Qwen2 (random weights, bf16), where the GPU is not launch-bound.
# 4. Plain continuous batching of 32 Spec-Bench requests at batch sizes 1, 8 and 32 (bf16): tokens/s.
# MODEL: 'default', a .gguf file or a Hugging Face directory (SKIP_ATTENTION / SKIP_MLP: the skip-only
# draft's layers, by default a quarter of the default model's 60 sub-layers). PARTS: 'tests', 'timings'
# or both (the default), so that a short device lease can take them in two calls. Writes up to 8 files
# to OUT_DIR (a device tool returns at most 8).
set -u
model=${1:-default}
data=${2:-../shared/data/spec_bench/question.jsonl}
out=${3:-cuda-check}
python=${PYTHON:-python3}
skip_attention=${SKIP_ATTENTION:-2,5,8,11,14,17,20}
skip_mlp=${SKIP_MLP:-1,4,7,10,13,16,19,22}
parts=${PARTS:-tests timings}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$python" -c "import torch, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda,
'transformers', transformers.__version__, torch.cuda.get_device_name())"; } > "$out/gpu.log" 2>&1

if [[ " $parts " == *" tests "* ]]; then
KNN_SSD_CUDA_MODEL="$model" timeout 270 "$python" -m pytest -q -s -p no:cacheprovider tests/test_cuda.py \
  > "$out/tests.log" 2>&1
echo "tests rc=$?" >> "$out/tests.log"
fi
[[ " $parts " == *" timings "* ]] || exit 0

for dtype in float32 bfloat16; do
  timeout 90 "$python" -m server.cli bench-decode --model "$model" --device cuda --dtype "$dtype" --data "$data" \
    --prompts 6 --max-new-tokens 64 --draft-precision full --skip-attention "$skip_attention" --skip-mlp "$skip_mlp" \
    --threshold 0.3 --max-draft 6 --json "$out/decode-$dtype.json" > "$out/decode-$dtype.log" 2>&1
  echo "rc=$?" >> "$out/decode-$dtype.log"
done

timeout 90 "$python" - > "$out/qwen2-1.5b-shape.log" 2>&1 <<'EOF'
import json, torch
from transformers import AutoModelForCausalLM, Qwen2Config
from decoding import ModelRunner
from decoding.benchmark import forward_latencies
config = Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                     num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
ms = forward_latencies(ModelRunner(model, int8_draft=True))
print(json.dumps({k: round(v, 3) for k, v in ms.items()}))
print(json.dumps({k: round(v / ms["forward_1"], 3) for k, v in ms.items()}))
EOF
echo "rc=$?" >> "$out/qwen2-1.5b-shape.log"

timeout 90 "$python" - "$model" "$data" > "$out/batched.log" 2>&1 <<'EOF'
import json, sys, time
from pathlib import Path
from decoding import PLAIN, ModelRunner, SamplingParams, SpeculativeEngine, load_model
from decoding.batching import generate_batch
from decoding.benchmark import spec_bench_prompts
hf_model, tokenizer, info = load_model(sys.argv[1], device="cuda", dtype="bfloat16")
engine = SpeculativeEngine(ModelRunner(hf_model), tokenizer)
prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
           for _, text in spec_bench_prompts(Path(sys.argv[2]), 32)]
requests = [(ids, SamplingParams(max_tokens=64, ignore_eos=True), PLAIN) for ids in prompts]
generate_batch(engine, requests[:2], max_batch_size=2)  # warm-up
outputs = {}
for size, count in ((1, 4), (8, 32), (32, 32)):
    t0 = time.perf_counter()
    seqs = generate_batch(engine, requests[:count], max_batch_size=size, max_batched_tokens=4096)
    elapsed = time.perf_counter() - t0
    outputs[size] = [seq.generated for seq in seqs]
    tokens = sum(len(s) for s in outputs[size])
    print(json.dumps({"batch_size": size, "requests": count, "tokens": tokens, "s": round(elapsed, 3),
                      "tokens_per_s": round(tokens / elapsed, 1)}))
print(f"first 4 requests: batch 32 equals batch 1 in {sum(a == b for a, b in zip(outputs[1], outputs[32]))}/4; "
      f"batch 8 equals batch 32 in {sum(a == b for a, b in zip(outputs[8], outputs[32]))}/32")
EOF
echo "rc=$?" >> "$out/batched.log"
