#!/usr/bin/env bash
# The GPU check, run from the repository root on a machine with a CUDA GPU:
#   tests/cuda_check.sh [MODEL] [SPEC_BENCH_JSONL] [OUT_DIR]
# 1. tests/test_cuda.py: greedy speculation (layer-skip drafts, one with n-gram lookup first) = plain
#    decoding (but at near-ties) in float32 and bfloat16, tiny Llama/Qwen2/Qwen3/Mistral/Gemma/Gemma2
#    configs, batching = solo, seeded sampling.
# 2. bench-decode in float32 and bfloat16: forward latencies (1-token, k-token verify, drafts) and plain
#    vs speculative tokens/s with a draft skipping a quarter of the sub-layers (no quantised copy on CUDA).
# 3. Forward latencies of a 1.5B-shaped Qwen2 (random weights, bf16), where the GPU is not launch-bound.
# MODEL: 'default', a .gguf file or a Hugging Face directory (SKIP_ATTENTION / SKIP_MLP: the skip-only
# draft's layers, by default a quarter of the default model's 60 sub-layers). Writes 7 files to OUT_DIR.
set -u
model=${1:-default}
data=${2:-../shared/data/spec_bench/question.jsonl}
out=${3:-cuda-check}
python=${PYTHON:-python3}
skip_attention=${SKIP_ATTENTION:-2,5,8,11,14,17,20}
skip_mlp=${SKIP_MLP:-1,4,7,10,13,16,19,22}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$python" -c "import torch, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda,
'transformers', transformers.__version__, torch.cuda.get_device_name())"; } > "$out/gpu.log" 2>&1

KNN_SSD_CUDA_MODEL="$model" timeout 240 "$python" -m pytest -q -s -p no:cacheprovider tests/test_cuda.py \
  > "$out/tests.log" 2>&1
echo "tests rc=$?" >> "$out/tests.log"

for dtype in float32 bfloat16; do
  timeout 100 "$python" -m server.cli bench-decode --model "$model" --device cuda --dtype "$dtype" --data "$data" \
    --prompts 8 --max-new-tokens 64 --draft-precision full --skip-attention "$skip_attention" --skip-mlp "$skip_mlp" \
    --threshold 0.3 --max-draft 6 --json "$out/decode-$dtype.json" > "$out/decode-$dtype.log" 2>&1
  echo "rc=$?" >> "$out/decode-$dtype.log"
done

timeout 100 "$python" - > "$out/qwen2-1.5b-shape.log" 2>&1 <<'EOF'
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
