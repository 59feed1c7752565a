"""Every PromQL expression of the Grafana dashboard, evaluated by a real Prometheus scraping a live server.

Prometheus (Debian package ``prometheus``, installed by ``make test`` when missing) runs on 127.0.0.1 with
docker/prometheus.yml, its target swapped for the live server. Checks: no expression errors or names a
metric the server does not export; an idle server gives no NaN; after traffic every panel has data.
"""

from __future__ import annotations

import json
import math
import re

import httpx
import pytest
from live_server import LiveServer
from prometheus_client.parser import text_string_to_metric_families
from prometheus_server import DOCKER, Prometheus, prometheus_binary

MODEL_NAME = "smollm2-dash"
METRIC = re.compile(r"\bknn_ssd_[a-z0-9_]+")
LABEL_VALUES = re.compile(r"label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")
# Dashboard variables as Grafana substitutes them ($__rate_interval: a window spanning several scrapes).
VARIABLES = {"$__rate_interval": "1m", "$model": MODEL_NAME, "$replica": ".*", "$domain": ".*"}


def substitute(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def dashboard() -> dict:
    return json.loads((DOCKER / "grafana" / "knn-ssd.json").read_text())


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel."""
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p.get("targets", [])]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    binary = prometheus_binary()
    with LiveServer("--served-model-name", MODEL_NAME) as server:
        prometheus = Prometheus(binary, server.url.removeprefix("http://"), tmp_path_factory.mktemp("prometheus"))
        try:
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
        assert values or var["name"] == "replica", f"variable {var['name']} has no values"  # Ray's: test_ray_serve
    assert MODEL_NAME in prometheus.label_values("knn_ssd_requests_running", "model")
    with capsys.disabled():
        print(f"\n[dashboard] {len(targets)} of {len(targets)} PromQL expressions of docker/grafana/knn-ssd.json "
              f"evaluated by Prometheus ({len(variables)} template variables too): no errors, all with data")
