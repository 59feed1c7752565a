"""``knn-ssd`` sub-commands that drive the router: ``calibrate``, ``route-eval`` and ``bench``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from decoding.cli_args import POSITIVE, add_chat_template_arg, add_command, add_model_args, existing_file

from .router import Router


def load_index(index: str, model: str, fingerprint: str, target: str) -> Router:
    """The router of ``--index`` (``auto``: the artifact shipped for ``model`` and ``target``); a clear exit
    where there is none."""
    from .artifact import ArtifactError, artifact_dir, load_router

    directory = artifact_dir(index, model, target)
    if directory is None:
        raise SystemExit(f"--index {index}: no shipped artifact for model {model!r}; pass --index DIR "
                         "(made by 'knn-ssd calibrate')")
    try:
        return load_router(directory, fingerprint)
    except ArtifactError as exc:
        raise SystemExit(f"--index {index}: {exc}") from None


def _domain_files(specs: list[str]) -> list[tuple[str, Path]]:
    """``--domain NAME=FILE.jsonl`` values as (name, path), each checked before any model loads."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--domain expects NAME=FILE.jsonl, got {spec!r}")
        if not Path(path).is_file():
            raise SystemExit(f"--domain {spec}: no such file")
        out.append((name, Path(path)))
    return out


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Calibrate per-domain decoding policies and build a routing artifact.

    Embed calibration prompts (labelled domains, and/or unlabelled traffic clustered into domains), cluster
    anchors per domain, search and confirm a draft policy per domain (and a 'mixed' fallback), write the
    artifact.
    """
    from decoding.build import ChatTemplateError, load_engine_for

    from .calibrate import CalibrationConfig, calibrate, cluster_traffic, read_domain_file

    if not args.domain and not args.traffic:
        raise SystemExit("calibrate needs prompts: --domain NAME=FILE.jsonl (repeatable) and/or --traffic FILE.jsonl")
    files = _domain_files(args.domain or [])
    try:
        engine, info = load_engine_for(args, chat_template=args.chat_template)
    except ChatTemplateError as exc:
        raise SystemExit(str(exc)) from None
    try:  # a line that is not JSON, has no prompt or does not render
        domains = {name: read_domain_file(path, engine.tokenizer) for name, path in files}
        traffic = read_domain_file(Path(args.traffic), engine.tokenizer) if args.traffic else None
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
    print_calibration(report)
    return 0


def print_calibration(report: dict[str, Any]) -> None:
    """The per-domain table of a calibration report: chosen policy, expected and measured speedups."""
    from decoding.policy import DraftPolicy

    nan = float("nan")
    print(f"{'domain':<16}{'policy':<13}{'expected':>9}{'measured':>9}{'accept':>8}{'tokens/step':>12}  draft")
    for name, r in report["domains"].items():
        draft = "-" if r["chosen"] == "plain" else DraftPolicy.from_dict(r["policy"]).describe()
        print(f"{name:<16}{r['chosen']:<13}{r['expected_speedup']:>9.2f}{r.get('measured_speedup', nan):>9.2f}"
              f"{r.get('acceptance_rate', nan):>8.2f}{r.get('mean_accepted_tokens', nan):>12.2f}  {draft}")


def cmd_route_eval(args: argparse.Namespace) -> int:
    """Routing accuracy on Spec-Bench and router lookup latency.

    Route Spec-Bench prompts with an artifact and report accuracy per domain; time lookups over many random
    anchors.
    """
    from decoding.build import load_engine_for

    from .evaluate import lookup_latency, routing_accuracy, spec_bench_by_domain

    result: dict = {"lookup_latency": lookup_latency(args.anchors)}
    if not args.latency_only:
        engine, info = load_engine_for(args, draft_copies=False)
        router = load_index(args.index, args.model, info.fingerprint, engine.runner.target)
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


def cmd_bench(args: argparse.Namespace) -> int:
    """Speedup benchmark under domain shift: plain, Self-SD Fix/Mix, KNN-SSD, oracle.

    Decode held-out Spec-Bench prompts of six domains with plain decoding, every domain's policy for all
    prompts (Self-SD Fix), the union's policy (Self-SD Mix), the routed policy (KNN-SSD) and each prompt's own
    domain policy (oracle), interleaved prompt by prompt; check every output against plain decoding; write
    report.json, report.md and speedup.png.
    """
    from decoding.build import load_engine_for

    from .bench import STREAMS, run_benchmark
    from .bench_report import markdown, write_report

    if args.quick:
        args.per_domain, args.max_new_tokens, args.streams = 1, 16, "mixed"
    streams = [s.strip() for s in args.streams.split(",") if s.strip()]
    unknown = set(streams) - set(STREAMS)
    if unknown or not streams:
        raise SystemExit(f"--streams: choose from {', '.join(STREAMS)}")
    engine, info = load_engine_for(args)
    router = load_index(args.index, args.model, info.fingerprint, engine.runner.target)
    router.restrict_precisions(engine.runner.draft_precisions)  # e.g. int4 policies on CUDA
    report = run_benchmark(engine, info, router, Path(args.data), args.per_domain, args.max_new_tokens, args.seed,
                           streams, args.stop_at_eos, args.headroom)
    report["command"] = " ".join(["knn-ssd", *sys.argv[1:]])
    write_report(report, Path(args.out))
    print(markdown(report))
    print(f"wrote {args.out}/report.json, report.md, speedup.png")
    return 0


def add_calibrate(sub: argparse._SubParsersAction) -> None:
    cal = add_command(sub, cmd_calibrate)
    add_model_args(cal)
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
    add_chat_template_arg(cal, "it renders 'messages' (and 'tools') lines; give the one `serve --chat-template` "
                               "serves with, so anchors are embedded from the prompts the router will see")
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


def add_route_eval(sub: argparse._SubParsersAction, spec_bench: Path) -> None:
    route = add_command(sub, cmd_route_eval)
    add_model_args(route)
    route.add_argument("--index", default="auto",
                       help="artifact directory ('auto': the one shipped for the model and target)")
    route.add_argument("--data", type=existing_file, default=str(spec_bench), help="Spec-Bench question.jsonl")
    route.add_argument("--per-domain", type=POSITIVE, default=80,
                       help="prompts per domain, spread evenly (80: all 480 Spec-Bench questions)")
    route.add_argument("--anchors", type=POSITIVE, default=10_000, help="anchors for the latency benchmark")
    route.add_argument("--latency-only", action="store_true", help="only the lookup latency benchmark")
    route.add_argument("--json", default=None, help="also write the figures to this JSON file")


def add_bench(sub: argparse._SubParsersAction, spec_bench: Path) -> None:
    bench = add_command(sub, cmd_bench)
    add_model_args(bench)
    bench.add_argument("--index", default="auto",
                       help="calibration artifact directory ('auto': the one shipped for the model and target)")
    bench.add_argument("--data", type=existing_file, default=str(spec_bench),
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
    bench.add_argument("--headroom", action="store_true",
                       help="also decode every prompt with lookup drafts alone of 1, 2, 3, 4, 6 and 8 tokens (and "
                            "each quantised draft copy with lookup) as extra Self-SD Fix rows, so the report's "
                            "per-domain headroom table shows what routing among them could win over Self-SD Mix "
                            "(each extra policy adds about one decoding per prompt)")
    bench.add_argument("--quick", action="store_true",
                       help="1 prompt per domain, 16 tokens, mixed stream only: checks structure and losslessness")
