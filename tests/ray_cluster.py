"""A local two-node Ray cluster (one CPU each) and a ``knn-ssd serve --replicas`` on it, for the Ray tests."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from live_server import LiveServer

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install -e '.[ray]'; make test does it)")
serve = pytest.importorskip("ray.serve")
from ray.cluster_utils import Cluster  # noqa: E402

# Autoscaling decisions read load figures the replicas and the ingress push this often (Ray's default: 10 s).
os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
STORE_BYTES = 100 << 20  # each node's object store: the app passes small messages only


def two_node_cluster() -> Iterator[Cluster]:
    """A head and a worker node of one CPU each; this test process is a driver on it."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": STORE_BYTES})
    cluster.add_node(num_cpus=1, object_store_memory=STORE_BYTES)
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def ray_server(cluster: Cluster, *args: str) -> LiveServer:
    """``knn-ssd serve`` with ``args`` deployed on ``cluster`` (one torch thread per replica)."""
    return LiveServer("--ray-address", cluster.address, "--threads-per-replica", "1", *args, startup_timeout=240)


def live_replicas(url: str) -> list[str]:
    """The replica ids the application's ``/health`` lists (those answering)."""
    try:
        return httpx.get(f"{url}/health", timeout=10).json().get("replicas", [])
    except httpx.HTTPError:
        return []


def wait_for(condition, timeout: float, what: str, interval: float = 0.5):
    """Poll ``condition`` until it returns something true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def requests_by_replica(url: str) -> dict[str, float]:
    """Finished 200 requests per replica, from the application's ``/metrics``."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        if family.name == "knn_ssd_requests":
            for s in family.samples:
                if s.name.endswith("_total") and s.labels["status"] == "200":
                    counts[s.labels["replica"]] = counts.get(s.labels["replica"], 0) + s.value
    return counts


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {r: after[r] - before.get(r, 0) for r in after if after[r] - before.get(r, 0)}
