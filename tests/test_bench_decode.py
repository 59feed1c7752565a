"""`knn-ssd bench-decode` end to end on the default model with its default flags (the native target where
the kernels run): latencies, plain vs speculative tokens/s, identical outputs."""

from __future__ import annotations

import json
import subprocess
import sys

from live_server import ROOT

from decoding import native


def test_bench_decode_runs_with_its_defaults(tmp_path):
    report_path = tmp_path / "decode.json"
    result = subprocess.run([sys.executable, "-m", "server.cli", "bench-decode", "--prompts", "2",
                             "--max-new-tokens", "8", "--lookup", "--json", str(report_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    native_target = native.cpu_kernels() is not None
    assert report["target"] == ("native" if native_target else "exact")
    # --draft-precision auto: the native target has no quantised copy, so the draft runs the model's own weights
    assert report["throughput"]["policy"]["precision"] == ("full" if native_target else "int8")
    assert report["throughput"]["identical_outputs"] == "2/2"
    assert {"forward_1", "verify_2", "verify_12", "draft_skip25"} <= set(report["latency_ms"])
    rates = report["throughput"]["tokens_per_s"]
    assert rates["plain"] > 0 and rates["speculative"] > 0
    assert ("transformers" in rates) is not native_target  # generate() needs the widened weights
    assert "speculative / plain" in result.stdout
