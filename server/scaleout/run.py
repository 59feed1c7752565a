"""``knn-ssd serve --replicas N``: start or join a Ray cluster, deploy the application, serve until stopped."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from typing import Any

import ray
from ray import serve

from ..config import ServerConfig
from ..serve_args import serve_parser
from .deployments import APP_NAME, ScaleConfig, build_application, directory_name

log = logging.getLogger("knn_ssd.scaleout")


def scale_config(args: argparse.Namespace) -> ScaleConfig:
    """Replica counts and threads from the flags: ``--replicas`` alone is a fixed count; ``--min-replicas``
    and ``--max-replicas`` autoscale (starting from ``--replicas``, clamped into the range)."""
    low = args.min_replicas or args.replicas or 1
    high = max(args.max_replicas or args.replicas or low, low)
    initial = min(max(args.replicas or low, low), high)
    threads = args.threads_per_replica or max(1, (os.cpu_count() or 1) // high)
    target = args.target_ongoing_requests or float(args.max_batch_size)
    return ScaleConfig(low, high, initial, threads, target, args.upscale_delay_s, args.downscale_delay_s,
                       args.autoscale_window_s)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Ray Serve's application builder, for ``serve deploy`` and KubeRay's RayService
    (``import_path: server.scaleout.run:app_builder``): ``args`` are ``knn-ssd serve`` flags without their
    dashes (``{"model": "default", "max-replicas": 4, "no-ui": true}``), checked as the command line does."""
    argv = []
    for name, value in args.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False and value is not None:
            argv += [flag, str(value)]
    try:
        parsed = serve_parser().parse_args(argv)
    except SystemExit:  # argparse printed which flag is wrong
        raise ValueError(f"not valid `knn-ssd serve` flags: {args}") from None
    return build_application(ServerConfig.from_args(parsed), scale_config(parsed))


def run_ray_server(args: argparse.Namespace) -> int:
    """Deploy the application on the cluster of ``--ray-address`` and block until SIGINT/SIGTERM."""
    config = ServerConfig.from_args(args)
    scale = scale_config(args)
    address = None if args.ray_address == "local" else args.ray_address
    ray.init(address=address, logging_level=logging.WARNING)
    stop = threading.Event()  # set by SIGINT/SIGTERM, also while the application deploys
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info("Ray cluster %s: %s", ray.get_runtime_context().gcs_address, ray.cluster_resources())
    serve.start(proxy_location=args.proxy_location, http_options={"host": args.host, "port": args.port})
    how = (f"autoscaled between {scale.min_replicas} and {scale.max_replicas} (target {scale.target_ongoing_requests:g}"
           " ongoing requests per replica)" if scale.autoscaling else f"{scale.min_replicas}")
    log.info("deploying %s replicas of model %s, %d threads each", how, config.model, scale.threads)
    serve.run(build_application(config, scale), name=APP_NAME, route_prefix="/", blocking=False)
    log.info("ready: http://%s:%d/v1 (Ray Serve application %r)", args.host, args.port, APP_NAME)
    stop.wait()
    log.info("stopping: replicas finish their requests (up to --drain-timeout %gs)", config.drain_timeout)
    serve.delete(APP_NAME, _blocking=False)
    deadline = time.monotonic() + config.drain_timeout + 10
    while APP_NAME in serve.status().applications and time.monotonic() < deadline:
        time.sleep(0.5)
    try:
        ray.kill(ray.get_actor(directory_name(APP_NAME), namespace="serve"))
    except ValueError:  # no replica ever registered
        pass
    ray.shutdown()  # a local cluster stops with it; a joined one keeps running
    return 0
