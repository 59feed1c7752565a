"""The flags of ``knn-ssd serve`` (one process, or replicas on Ray Serve), each also an environment variable."""

from __future__ import annotations

import argparse
import os

from decoding.cli_args import (
    NON_NEGATIVE,
    NON_NEGATIVE_FLOAT,
    POSITIVE,
    add_chat_template_arg,
    add_model_args,
    at_least,
    port_number,
)

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


def add_scaleout_args(serve: argparse.ArgumentParser) -> None:
    """Flags of the Ray Serve scale-out (``server.scaleout``; the extra ``.[ray]``)."""
    group = serve.add_argument_group("scale-out on Ray Serve (pip install -e \".[ray]\"; docs/deployment.md)")
    group.add_argument("--replicas", type=POSITIVE, default=None,
                       help="serve N replicas (each a whole server: model, index, batching, speculation) behind one "
                            "endpoint on Ray Serve; with --min/--max-replicas, the count to start with")
    group.add_argument("--min-replicas", type=POSITIVE, default=None,
                       help="autoscale: fewest replicas (Ray Serve adds and removes replicas between the two by the "
                            "ongoing requests, queued and running, per replica)")
    group.add_argument("--max-replicas", type=POSITIVE, default=None, help="autoscale: most replicas")
    group.add_argument("--target-ongoing-requests", type=at_least(0.1, float), default=None,
                       help="autoscale: ongoing requests per replica that Ray Serve aims at (default: "
                            "--max-batch-size)")
    group.add_argument("--upscale-delay-s", type=NON_NEGATIVE_FLOAT, default=10.0,
                       help="autoscale: seconds the load must stay high before a replica is added")
    group.add_argument("--downscale-delay-s", type=NON_NEGATIVE_FLOAT, default=120.0,
                       help="autoscale: seconds the load must stay low before a replica is removed")
    group.add_argument("--autoscale-window-s", type=at_least(1, float), default=30.0,
                       help="autoscale: seconds over which the ongoing requests are averaged")
    group.add_argument("--threads-per-replica", type=POSITIVE, default=None,
                       help="torch threads of each replica, also the CPUs Ray reserves for it, so replicas sharing "
                            "a machine do not oversubscribe its cores (default: this machine's cores over the most "
                            "replicas)")
    group.add_argument("--ray-address", default="local",
                       help="the Ray cluster: 'local' starts one on this machine, 'auto' joins the one `ray start` "
                            "runs here, or a head node's address (host:6379)")
    group.add_argument("--proxy-location", default="HeadOnly", choices=["HeadOnly", "EveryNode"],
                       help="where Ray Serve's HTTP proxies listen on --host/--port: the head node only, or every "
                            "node (for a load balancer in front of the cluster)")


def add_serve_args(serve: argparse.ArgumentParser) -> None:
    """Every ``knn-ssd serve`` flag, each also read from ``KNN_SSD_<FLAG>``."""
    add_model_args(serve)
    serve.add_argument("--index", default="auto",
                       help="calibration artifact directory for KNN routing; 'auto' uses the one shipped for the "
                            "model (the default one and qwen2.5-coder-1.5b) and the target it runs, 'none' "
                            "disables routing")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind")
    serve.add_argument("--port", type=port_number, default=8000, help="port to bind")
    serve.add_argument("--served-model-name", default=None,
                       help="model name clients send and see in /v1/models (default: the --model value)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 endpoints")
    serve.add_argument("--allowed-origins", type=_origins, default=None, metavar="ORIGINS",
                       help="comma-separated origins (e.g. 'https://app.example.com', or '*') whose browser pages "
                            "may call the API (CORS); default: none, as browsers then refuse cross-origin calls")
    serve.add_argument("--no-ui", action="store_true",
                       help="do not serve the playground page at / and /playground (the API is unchanged)")
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
    add_chat_template_arg(serve, "e.g. one that renders `tools` for OpenAI tool calling (calls are read in the "
                                 "Hermes <tool_call> format)")
    serve.add_argument("--drain-timeout", type=NON_NEGATIVE_FLOAT, default=30.0,
                       help="seconds SIGTERM waits for in-flight requests before exiting")
    add_scaleout_args(serve)
    env_defaults(serve)


def serve_parser() -> argparse.ArgumentParser:
    """A parser of ``knn-ssd serve``'s flags alone (Ray Serve's application builder reads its args with it)."""
    parser = argparse.ArgumentParser(prog="knn-ssd serve")
    add_serve_args(parser)
    return parser
