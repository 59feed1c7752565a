"""API key, queue limits (503 + Retry-After), SIGTERM draining and SIGHUP index reloads, on dedicated servers."""

from __future__ import annotations

import json
import shutil
import signal
import threading

import httpx
import pytest
from live_server import LiveServer

from decoding import DraftPolicy
from knn_router.artifact import default_artifact_dir

KEY = "sk-test-123"
ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def small_server():
    with LiveServer("--index", "none", "--api-key", KEY, "--max-concurrency", "1", "--max-queue", "1",
                    "--served-model-name", "smol", "--drain-timeout", "60",
                    "--allowed-origins", ORIGIN) as live:
        yield live


def _auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("headers", [{}, _auth("wrong"), {"Authorization": "Basic abc"}])
def test_missing_or_wrong_key_is_401(small_server, headers):
    r = httpx.post(small_server.url + "/v1/completions", json={"model": "smol", "prompt": "a"}, headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(small_server.url + "/v1/models", headers=headers).status_code == 401


def test_served_model_name(small_server):
    r = httpx.get(small_server.url + "/v1/models", headers=_auth())
    assert r.json()["data"][0]["id"] == "smol"
    r = httpx.post(small_server.url + "/v1/completions", json={"model": "default", "prompt": "a"}, headers=_auth())
    assert r.status_code == 404


def test_browser_pages_of_allowed_origins_only_may_call(small_server):
    """CORS: the preflight needs no API key; the call itself still does."""
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(small_server.url + "/v1/chat/completions", headers={"Origin": ORIGIN, **preflight})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = httpx.options(small_server.url + "/v1/chat/completions",
                      headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(small_server.url + "/v1/models", headers={"Origin": ORIGIN, **_auth()})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert httpx.get(small_server.url + "/v1/models", headers={"Origin": ORIGIN}).status_code == 401


def test_full_queue_is_503_with_retry_after(small_server):
    """Capacity is one running plus one queued: of three concurrent requests one is refused."""
    body = {"model": "smol", "prompt": "Tell a long story.", "max_tokens": 60, "temperature": 0, "ignore_eos": True}
    responses: list[httpx.Response] = []

    def post() -> None:
        responses.append(httpx.post(small_server.url + "/v1/completions", json=body, headers=_auth(), timeout=120))

    threads = [threading.Thread(target=post) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status_code for r in responses) == [200, 200, 503]
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["retry-after"] == "1"
    assert rejected.json()["error"]["code"] == "server_overloaded"


def test_sigterm_drains_in_flight_stream(small_server):
    body = {"model": "smol", "prompt": "Count slowly:", "max_tokens": 40, "temperature": 0, "stream": True,
            "ignore_eos": True}
    lines: list[str] = []
    with httpx.stream("POST", small_server.url + "/v1/completions", json=body, headers=_auth(),
                      timeout=120) as response:
        for line in response.iter_lines():
            if line and not lines:
                small_server.terminate()  # mid-stream
            if line:
                lines.append(line)
    assert lines[-1] == "data: [DONE]"
    finished = [line for line in small_server.log_text().splitlines() if " length: " in line and "request " in line]
    assert finished and "40 generated" in finished[-1] and "first token" in finished[-1]  # one line per request
    # uvicorn re-raises SIGTERM after its graceful shutdown, so -SIGTERM is a clean exit here
    assert small_server.proc.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "shutting down the engine loop" in small_server.log_text()
    with pytest.raises(httpx.ConnectError):
        httpx.get(small_server.url + "/health")


def test_artifact_of_another_model_stops_startup(tmp_path):
    artifact = tmp_path / "artifact"
    shutil.copytree(default_artifact_dir(), artifact)
    manifest = json.loads((artifact / "router.json").read_text())
    manifest["model"]["fingerprint"] = "0" * 32
    (artifact / "router.json").write_text(json.dumps(manifest))
    with pytest.raises(RuntimeError, match="made for model fingerprint 0{32}"):
        LiveServer("--index", str(artifact))


def test_sighup_reloads_a_recalibrated_index(tmp_path):
    """Recalibrate (here: rename the chat domain), `kill -HUP`, and the running server routes with the new
    index; a broken artifact on the next SIGHUP leaves the running index in place."""
    from safetensors.numpy import load_file

    from knn_router.artifact import save_artifact
    from knn_router.router import Router

    index = tmp_path / "index"
    shutil.copytree(default_artifact_dir(), index)
    body = {"model": "default", "prompt": "Hello", "max_tokens": 2, "domain": "chat-v2"}
    with LiveServer("--index", str(index), "--no-adaptive-speculation") as live:
        def status() -> int:
            return httpx.post(f"{live.url}/v1/completions", json=body, timeout=60).status_code

        def after_sighup(expected: int) -> int:
            live.proc.send_signal(signal.SIGHUP)
            for _ in range(50):
                if status() == expected:
                    break
                threading.Event().wait(0.2)
            return status()

        assert status() == 400  # unknown domain
        manifest = json.loads((index / "router.json").read_text())
        rename = {"chat": "chat-v2"}
        policies = {rename.get(name, name): DraftPolicy.from_dict(p) for name, p in manifest["policies"].items()}
        anchors = load_file(str(index / "anchors.safetensors"))["anchors"]
        labels = [rename.get(label, label) for label in manifest["labels"]]
        save_artifact(index, Router(anchors, labels, policies), anchors, manifest["model"], {"note": "renamed"},
                      manifest["target"])
        assert after_sighup(200) == 200
        (index / "router.json").write_text("{broken")
        assert after_sighup(400) == 200  # the reload failed: chat-v2 is still served
        assert "index reload failed" in live.log_text() and "index reloaded" in live.log_text()
        scraped = httpx.get(f"{live.url}/metrics").text
        for result in ("ok", "failed"):
            assert f'knn_ssd_index_reloads_total{{model="default",result="{result}"}} 1.0' in scraped


def test_bad_model_stops_startup_with_one_line():
    """A wrong --model (or --index, --device) ends `serve` with one line and a failing status, no traceback."""
    import subprocess
    import sys
    from pathlib import Path

    run = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", "/nonexistent/model"],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "knn-ssd serve: model path /nonexistent/model does not exist" in run.stderr
    from server import package_version  # the first log line says what is running, for bug reports
    assert f"knn-ssd {package_version()} (torch " in run.stderr and "loading model /nonexistent/model" in run.stderr


def test_version_endpoint(server):
    from server import package_version

    r = httpx.get(server.url + "/version")
    assert r.status_code == 200 and r.json() == {"version": package_version()}


def test_version(capsys):
    from server import package_version
    from server.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out == f"knn-ssd {package_version()}\n"
    assert package_version() != "unknown"  # the suite runs in the installed (editable) package
