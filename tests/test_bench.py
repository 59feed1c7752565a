"""`knn-ssd bench --quick` end to end on the default model: report structure and losslessness."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from live_server import ROOT

from decoding import native
from decoding.benchmark import SPEC_BENCH
from decoding.divergence import tie_tolerance
from knn_router.artifact import default_artifact_dir, load_router
from knn_router.bench import run_benchmark, split_prompts
from knn_router.evaluate import spec_bench_by_domain

METRIC_KEYS = {"speedup", "tokens_per_s", "mean_accepted_tokens", "acceptance_rate"}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run([sys.executable, "-m", "server.cli", "bench", "--quick", "--headroom", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads((out / "report.json").read_text()), result.stdout


def test_quick_bench_report_structure(quick_report):
    out, report, stdout = quick_report
    for key in ("model", "device", "dtype", "target", "max_new_tokens", "prompts_per_domain", "lossless",
                "exact_match_rate", "divergences_at_non_ties", "methods", "routing", "streams"):
        assert key in report, key
    assert report["max_new_tokens"] == 16 and report["prompts_per_domain"] == 1 and report["stop_at_eos"] is False
    assert report["target"] == ("native" if native.cpu_kernels() is not None else "exact")  # --target auto, a GGUF
    domains = {"translation", "summarization", "qa", "math_reasoning", "rag", "chat"}
    assert set(report["domains"]) == domains
    methods = report["methods"]
    assert {"plain", "self_sd_mix", "knn_ssd", "oracle", "self_sd_fix"} <= set(methods)
    assert {f"self_sd_fix_{d}" for d in domains} <= set(methods)
    for name, body in methods.items():
        assert METRIC_KEYS <= set(body["overall"]), name
        assert set(body["domains"]) == domains, name
        for d in domains:
            assert METRIC_KEYS <= set(body["domains"][d]), (name, d)
    assert methods["plain"]["overall"]["speedup"] == pytest.approx(1.0)
    assert methods["plain"]["overall"]["mean_accepted_tokens"] == 1.0
    assert 0 <= report["routing"]["accuracy"] <= 1
    assert 0 < report["routing"]["lookup_ms_p50"] <= report["routing"]["lookup_ms_p99"]
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| **KNN-SSD** |" in (out / "report.md").read_text()
    assert "Lossless: **True**" in stdout


def test_quick_bench_measures_the_per_domain_headroom(quick_report):
    """``--headroom``: lookup-only policies as extra Self-SD Fix rows, and each domain's best against Mix."""
    out, report, _ = quick_report
    extra = report["extra_fix_policies"]
    assert {f"lookup {n}" for n in (1, 2, 3, 4, 6, 8)} <= set(extra)
    assert all(f"self_sd_fix_{name}" in report["methods"] for name in extra)
    headroom, methods = report["headroom"], report["methods"]
    assert set(headroom["domains"]) == set(report["domains"])
    for domain, row in headroom["domains"].items():
        fixes = [body["domains"][domain]["speedup"] for name, body in methods.items()
                 if name.startswith("self_sd_fix_")]
        assert row["best_speedup"] == pytest.approx(max(fixes))
        assert row["mix_speedup"] == pytest.approx(methods["self_sd_mix"]["domains"][domain]["speedup"])
        assert row["headroom"] == pytest.approx(row["best_speedup"] / row["mix_speedup"])
    assert headroom["mix_speedup"] == pytest.approx(methods["self_sd_mix"]["overall"]["speedup"])
    assert "## Per-domain headroom over Self-SD Mix" in (out / "report.md").read_text()


def test_quick_bench_is_lossless_in_fp32(quick_report):
    _, report, _ = quick_report
    assert report["dtype"] == "float32"
    assert report["lossless"] is True
    assert report["exact_match_rate"] == 1.0
    assert report["divergences_at_non_ties"] == 0 and report["divergences"] == []


def test_evaluation_prompts_exclude_the_calibration_half():
    by_domain = spec_bench_by_domain(SPEC_BENCH)
    chosen = split_prompts(SPEC_BENCH, 5)
    for domain, texts in chosen.items():
        assert len(texts) == 5
        calibration = set(by_domain[domain][0::2])
        assert not calibration & set(texts), domain
    assert split_prompts(SPEC_BENCH, 5) == chosen  # deterministic


def test_tie_tolerance_is_zero_in_fp32_and_a_few_ulps_in_bf16():
    assert tie_tolerance(torch.float32, 20.0) == 0.0
    assert tie_tolerance(torch.bfloat16, 20.0) == pytest.approx(4 * 2**-7 * 20.0)


def test_bench_can_end_outputs_at_eos_and_stays_lossless(default_model, default_engine):
    """``--stop-at-eos``: outputs end where the model ends them (as served), every method the same tokens."""
    _, _, info = default_model
    router = load_router(default_artifact_dir(), info.fingerprint)
    report = run_benchmark(default_engine, info, router, SPEC_BENCH, per_domain=1, max_new_tokens=48, seed=0,
                           streams=["mixed"], stop_at_eos=True)
    assert report["stop_at_eos"] is True and report["lossless"] is True and report["exact_match_rate"] == 1.0
    plain = report["methods"]["plain"]["overall"]["tokens"]
    assert plain < 6 * 48  # some answers (translations at least) end before the limit
    assert all(m["overall"]["tokens"] == plain for m in report["methods"].values())
