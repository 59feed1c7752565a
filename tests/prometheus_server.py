"""A real Prometheus (Debian package ``prometheus``, installed by ``make test`` when missing) on 127.0.0.1,
scraping one target with docker/prometheus.yml's settings: the dashboard and Ray Serve tests use it."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from live_server import ROOT, free_port
from server.readiness import wait_ready

DOCKER = ROOT / "docker"


def prometheus_binary() -> str:
    """The prometheus binary; a skip (a failure in CI) where it is not installed."""
    binary = shutil.which("prometheus")
    if binary is None:
        message = "prometheus not installed (make test installs the Debian package when run as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


class Prometheus:
    """A real Prometheus process on 127.0.0.1 scraping ``target`` with the compose stack's settings."""

    def __init__(self, binary: str, target: str, workdir: Path) -> None:
        config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
        for job in config["scrape_configs"]:
            job["static_configs"] = [{"targets": [target]}]
        self.interval = float(config["global"]["scrape_interval"].rstrip("s"))
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_ready(f"{self.url}/-/ready", self.proc, timeout=60)
        self.wait_for_scrape_of('count_over_time(up{job="knn-ssd"}[5m])', 2)

    def query(self, expr: str) -> list[dict]:
        """Instant query; raises with Prometheus's own message when the expression is invalid."""
        body = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        if body["status"] != "success":
            raise AssertionError(f"{expr!r}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]["result"]

    def label_values(self, selector: str, label: str) -> list[str]:
        body = httpx.get(f"{self.url}/api/v1/label/{label}/values", params={"match[]": selector}, timeout=10).json()
        assert body["status"] == "success", body
        return body["data"]

    def wait_for_scrape_of(self, expr: str, value: float, timeout: float = 60) -> None:
        """Wait until the scraped ``expr`` reaches ``value`` (the server's figure at the time of the call)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.query(expr)
            if result and float(result[0]["value"][1]) >= value:
                return
            time.sleep(self.interval / 4)
        raise TimeoutError(f"prometheus did not scrape {expr} >= {value}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


