"""Every PromQL expression of the Grafana dashboard, evaluated by a real Prometheus scraping a live server.

Prometheus (Debian package ``prometheus``, installed by ``make test`` when missing) runs on 127.0.0.1 with
docker/prometheus.yml, its target swapped for the live server. Checks: no expression errors or names a
metric the server does not export; an idle server gives no NaN; after traffic every panel has data.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from live_server import ROOT, LiveServer, free_port
from prometheus_client.parser import text_string_to_metric_families

from server.readiness import wait_ready

DOCKER = ROOT / "docker"
MODEL_NAME = "smollm2-dash"
METRIC = re.compile(r"\bknn_ssd_[a-z0-9_]+")
LABEL_VALUES = re.compile(r"label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")
# Dashboard variables as Grafana substitutes them ($__rate_interval: a window spanning several scrapes).
VARIABLES = {"$__rate_interval": "1m", "$model": MODEL_NAME, "$domain": ".*"}


def substitute(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def dashboard() -> dict:
    return json.loads((DOCKER / "grafana" / "knn-ssd.json").read_text())


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel."""
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p.get("targets", [])]


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


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    binary = shutil.which("prometheus")
    if binary is None:
        message = "prometheus not installed (make test installs the Debian package when run as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    workdir = tmp_path_factory.mktemp("prometheus")
    with LiveServer("--served-model-name", MODEL_NAME) as server:
        prometheus = Prometheus(binary, server.url.removeprefix("http://"), workdir)
        try:
            wait_ready(f"{prometheus.url}/-/ready", prometheus.proc, timeout=60)
            prometheus.wait_for_scrape_of('count_over_time(up{job="knn-ssd"}[5m])', 2)
            yield server, prometheus
        finally:
            prometheus.stop()


def exported_names(server: LiveServer) -> set[str]:
    text = httpx.get(server.url + "/metrics").text
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def send_traffic(server: LiveServer) -> None:
    """Routed requests of several domains, a plain one, a streamed one and a bad one (400)."""
    prompts = ["Translate from German to English: Der Hund schläft im Garten.",
               "Summarize in one sentence: The city council met on Tuesday to discuss the new park budget.",
               "A farmer has 12 cows and buys 7 more. How many cows does he have?"]
    base = {"model": MODEL_NAME, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    for text in prompts:
        r = httpx.post(server.url + "/v1/chat/completions",
                       json={**base, "messages": [{"role": "user", "content": text}]}, timeout=120)
        assert r.status_code == 200, r.text
    r = httpx.post(server.url + "/v1/completions", json={**base, "prompt": "Once upon a time", "speculate": False},
                   timeout=120)
    assert r.status_code == 200, r.text
    with httpx.stream("POST", server.url + "/v1/completions", json={**base, "prompt": "The sky is", "stream": True},
                      timeout=120) as r:
        assert r.status_code == 200
        assert [line for line in r.iter_lines() if line][-1] == "data: [DONE]"
    r = httpx.post(server.url + "/v1/completions", json={**base, "prompt": "x", "top_p": 5})
    assert r.status_code == 400


def requests_seen(server: LiveServer) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "knn_ssd_requests_total")


def test_dashboard_expressions_against_real_prometheus(stack, capsys):
    server, prometheus = stack
    targets = dashboard_targets()
    assert len(targets) >= 25
    for title, expr in targets:  # idle: guarded denominators give no data or numbers, never NaN
        for series in prometheus.query(substitute(expr)):
            assert not math.isnan(float(series["value"][1])), f"{title}: NaN on an idle server: {expr}"

    for _ in range(2):  # two rounds, so that series born in the first one also show a rate in the second
        send_traffic(server)
        prometheus.wait_for_scrape_of(f'sum(knn_ssd_requests_total{{model="{MODEL_NAME}"}})', requests_seen(server))

    exported = exported_names(server)
    unknown = {name for _, expr in targets for name in METRIC.findall(expr)} - exported
    assert not unknown, f"dashboard refers to metrics the server does not export: {sorted(unknown)}"
    empty = []
    for title, expr in targets:
        result = prometheus.query(substitute(expr))
        values = [float(s["value"][1]) for s in result]
        assert not any(math.isnan(v) for v in values), f"{title}: NaN after traffic: {expr}"
        if not values:
            empty.append(f"{title}: {expr}")
    assert not empty, "panels without data after traffic:\n" + "\n".join(empty)

    variables = [v for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    for var in variables:
        match = LABEL_VALUES.match(var["query"]["query"])
        assert match, var
        values = prometheus.label_values(substitute(match["selector"]), match["label"])
        assert values, f"variable {var['name']} has no values"
    assert MODEL_NAME in prometheus.label_values("knn_ssd_requests_running", "model")
    with capsys.disabled():
        print(f"\n[dashboard] {len(targets)} of {len(targets)} PromQL expressions of docker/grafana/knn-ssd.json "
              f"evaluated by Prometheus ({len(variables)} template variables too): no errors, all with data")
