"""The ``knn-ssd`` command line: the server's own commands (serve, bench-serve), and each package's commands
(calibrate, route-eval and bench from ``knn_router``; install-model and bench-decode from ``decoding``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from decoding.benchmark import SPEC_BENCH
from decoding.cli_args import (
    NON_NEGATIVE_FLOAT,
    POSITIVE,
    add_command,
    counts,
    existing_file,
    port_number,
)
from decoding.commands import add_bench_decode, add_compare_targets, add_install_model
from decoding.loading import DEFAULT_MODEL
from knn_router.commands import add_bench, add_calibrate, add_route_eval

from . import package_version
from .serve_args import add_serve_args


def cmd_bench_serve(args: argparse.Namespace) -> int:
    """Throughput and latency of a server under concurrent clients.

    Stream chat completions from N concurrent clients per level (greedy, EOS ignored) and report aggregate
    tokens/s and time to first token. Without --url it starts its own server.
    """
    import subprocess

    import httpx

    from knn_router.evaluate import spec_bench_by_domain

    from .bench_serve import bench_serve, plot, print_report
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
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(report, Path(args.plot))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the OpenAI-compatible server.

    Run the OpenAI-compatible HTTP server (completions, chat, models, health, metrics); with --replicas
    (or --min/--max-replicas), many of them on Ray Serve behind one endpoint.
    """
    if args.replicas or args.min_replicas or args.max_replicas:
        try:
            from .scaleout.run import run_ray_server
        except ImportError as exc:
            raise SystemExit(f"knn-ssd serve --replicas needs Ray Serve: pip install -e \".[ray]\" ({exc})") from None
        return run_ray_server(args)
    from .app import run_server

    return run_server(args)


def add_serve(sub: argparse._SubParsersAction) -> None:
    add_serve_args(add_command(sub, cmd_serve))


def add_bench_serve(sub: argparse._SubParsersAction, spec_bench: Path) -> None:
    serve_bench = add_command(sub, cmd_bench_serve)
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
                                  "(speculate: false, the baseline), or peer (the --url server is another "
                                  "OpenAI-compatible server, e.g. llama.cpp's llama-server: OpenAI's fields only, "
                                  "with cache_prompt: false); with two modes, each level runs in both on the "
                                  "same server and reports speculative over plain tokens/s")
    serve_bench.add_argument("--rounds", type=POSITIVE, default=1,
                             help="runs of every mode per level, the order of --modes reversed every other round "
                                  "(2: speculative plain plain speculative), summed per mode: the mode that runs "
                                  "first at a level measured up to ~10%% slower here, so compare modes with 2")
    serve_bench.add_argument("--data", type=existing_file, default=str(spec_bench),
                             help="Spec-Bench question.jsonl (prompts)")
    serve_bench.add_argument("--json", default=None, help="also write the figures to this JSON file")
    serve_bench.add_argument("--plot", default=None,
                             help="also draw aggregate tokens/s and time to first token against clients, a line per "
                                  "mode, into this PNG file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="knn-ssd", description="An OpenAI-compatible LLM inference server that decodes with self-speculative "
        "decoding, its skipped layers chosen per request by a K-nearest-neighbour router. "
        "`knn-ssd COMMAND --help` explains each command's flags.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve(sub)
    add_calibrate(sub)
    add_route_eval(sub, SPEC_BENCH)
    add_bench(sub, SPEC_BENCH)
    add_bench_serve(sub, SPEC_BENCH)
    add_install_model(sub)
    add_bench_decode(sub, SPEC_BENCH)
    add_compare_targets(sub, SPEC_BENCH)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper() if hasattr(args, "log_level") else "INFO",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
