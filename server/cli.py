"""The ``knn-ssd`` command line: serve, calibrate, bench, bench-decode."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from decoding.loading import DEFAULT_MODEL


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="'default' (embedded SmolLM2-135M-Instruct), a local Hugging Face model directory, or a .gguf file")
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto",
                   help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or float16")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="logging verbosity")


def _skip_set_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-attention", default="", help="comma-separated attention layer indices the draft skips")
    p.add_argument("--skip-mlp", default="", help="comma-separated MLP layer indices the draft skips")
    p.add_argument("--draft-precision", default="int8", choices=["full", "int8"],
                   help="weights the draft runs on: the model's own (full) or the int8 copy")
    p.add_argument("--threshold", type=float, default=0.6,
                   help="stop drafting when the draft's top-1 probability falls below this")
    p.add_argument("--max-draft", type=int, default=10, help="most tokens drafted per verify step")


def _indices(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def cmd_bench_decode(args: argparse.Namespace) -> int:
    from decoding import DraftPolicy, ModelRunner, SkipSet, SpeculativeEngine, load_model
    from decoding.benchmark import decode_throughput, forward_latencies, spec_bench_prompts

    hf_model, tokenizer, info = load_model(args.model, args.device, args.dtype)
    runner = ModelRunner(hf_model, int8_draft=True)
    engine = SpeculativeEngine(runner, tokenizer)
    policy = DraftPolicy(SkipSet(_indices(args.skip_attention), _indices(args.skip_mlp)),
                         precision=args.draft_precision, threshold=args.threshold,
                         max_draft=args.max_draft).validate(runner.num_layers)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
               for _, text in spec_bench_prompts(Path(args.data), args.prompts)]
    latencies = forward_latencies(engine)
    result = decode_throughput(engine, prompts, policy, args.max_new_tokens, hf_generate=not args.no_transformers)
    report = {"model": info.to_dict(), "int8_draft_bytes": runner.int8_draft_bytes,
              "latency_ms": latencies, "throughput": result}
    print(f"model {info.name} ({info.architecture}, {info.num_layers} layers) on {info.device} {info.dtype}; "
          f"int8 draft copy {runner.int8_draft_bytes / 2**20:.0f} MiB")
    print("forward latency (ms, median):")
    base = latencies["forward_1"]
    for name, ms in latencies.items():
        print(f"  {name:<20} {ms:8.2f}  ({ms / base:.2f}x a 1-token forward)")
    rates = result["tokens_per_s"]
    print(f"decoding, {result['prompts']} Spec-Bench prompts x {result['max_new_tokens']} tokens:")
    for name, rate in rates.items():
        print(f"  {name:<20} {rate:8.2f} tokens/s")
    print(f"  speculative / plain  {result['speedup_vs_plain']:.2f}x; mean accepted tokens "
          f"{result['mean_accepted_tokens']:.2f}; identical outputs {result['identical_outputs']}")
    if result["plain_vs_transformers"]:
        print(f"  plain / transformers generate  {result['plain_vs_transformers']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import run_server

    return run_server(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knn-ssd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible server",
                           description="Run the OpenAI-compatible HTTP server (completions, chat, models, health, metrics).")
    _add_model_args(serve)
    serve.add_argument("--index", default="auto",
                       help="calibration artifact directory for KNN routing; 'auto' uses the shipped one for the "
                            "default model, 'none' disables routing")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind")
    serve.add_argument("--port", type=int, default=8000, help="port to bind")
    serve.add_argument("--served-model-name", default=None,
                       help="model name clients send and see in /v1/models (default: the --model value)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 endpoints")
    serve.add_argument("--max-concurrency", type=int, default=8, help="requests decoded at the same time")
    serve.add_argument("--max-queue", type=int, default=64,
                       help="requests waiting beyond --max-concurrency before new ones get 503")
    serve.add_argument("--max-model-len", type=int, default=None,
                       help="context length cap in tokens (default: the model's own)")
    serve.add_argument("--drain-timeout", type=float, default=30.0,
                       help="seconds SIGTERM waits for in-flight requests before exiting")
    serve.set_defaults(func=cmd_serve)

    bench_decode = sub.add_parser("bench-decode", help="decoding benchmark: latencies and plain vs speculative tokens/s",
                                  description="Forward latencies (1-token, k-token verify, drafts) and tokens/s of "
                                              "plain vs self-speculative decoding on Spec-Bench prompts.")
    _add_model_args(bench_decode)
    _skip_set_args(bench_decode)
    from decoding.benchmark import SPEC_BENCH
    bench_decode.add_argument("--data", default=str(SPEC_BENCH), help="Spec-Bench question.jsonl")
    bench_decode.add_argument("--prompts", type=int, default=10, help="number of prompts")
    bench_decode.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt")
    bench_decode.add_argument("--no-transformers", action="store_true",
                              help="skip timing transformers' generate() as a reference")
    bench_decode.add_argument("--json", default=None, help="also write the figures to this JSON file")
    bench_decode.set_defaults(func=cmd_bench_decode)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper() if hasattr(args, "log_level") else "INFO",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
