"""Routing by nearest anchors (real hnswlib), artifact integrity checks, and calibration end to end."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import chat_ids

from decoding import PLAIN, DraftPolicy, SamplingParams, SkipSet
from decoding.packaged import PACKAGED_MODELS
from knn_router.artifact import (
    SHIPPED_ARTIFACTS,
    TARGETS,
    ArtifactError,
    artifact_dir,
    load_router,
    read_manifest,
    save_artifact,
)
from knn_router.calibrate import CalibrationConfig, calibrate, cluster_traffic, read_domain_file
from knn_router.costs import fit_draft_cost
from knn_router.router import MIXED, Router
from server.cli import main

POLICIES = {"a": DraftPolicy(SkipSet([1]), precision="int8"), "b": PLAIN, MIXED: DraftPolicy(precision="int8")}


def _router(k: int = 1, threshold: float = 0.0) -> tuple[Router, np.ndarray]:
    anchors = np.array([[1, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 1, 0, 0], [0, 0.9, 0.1, 0]], dtype=np.float32)
    return Router(anchors, ["a", "a", "b", "b"], POLICIES, k=k, threshold=threshold), anchors


def test_nearest_anchor_decides():
    router, _ = _router()
    result = router.route(np.array([0.2, 1.0, 0.0, 0.0]))
    assert result.label == "b" and result.policy == PLAIN and not result.fallback
    assert 0.9 < result.similarity <= 1.0 and result.lookup_ms >= 0


def test_k_votes_weighted_by_similarity():
    anchors = np.array([[1, 0], [0.98, 0.2], [0.97, -0.24]], dtype=np.float32)
    router = Router(anchors, ["a", "b", "b"], POLICIES, k=3)
    assert router.route(np.array([1.0, 0.0])).label == "b"  # two close "b" anchors outvote one exact "a"
    assert Router(anchors, ["a", "b", "b"], POLICIES, k=1).route(np.array([1.0, 0.0])).label == "a"


def test_low_similarity_falls_back_to_mixed():
    router, _ = _router(threshold=0.8)
    result = router.route(np.array([0.0, 0.0, 0.0, 1.0]))
    assert result.label == MIXED and result.fallback and result.policy == POLICIES[MIXED]


def test_policies_without_their_draft_copy_are_replaced():
    int4 = DraftPolicy(SkipSet([2]), precision="int4", max_draft=6)
    policies = {"a": int4, "b": PLAIN, "c": DraftPolicy(SkipSet([1])), MIXED: DraftPolicy(precision="int8")}
    anchors = np.eye(3, dtype=np.float32)
    router = Router(anchors, ["a", "b", "c"], policies)
    assert router.restrict_precisions(("full", "int8", "int4")) == {}
    assert router.restrict_precisions(("full", "int8")) == {"a": int4}  # e.g. on CUDA: no int4 kernel
    assert router.policies["a"] == DraftPolicy(SkipSet([2]), precision="int8", max_draft=6)
    assert router.route(anchors[0]).policy == router.policies["a"]
    router = Router(anchors, ["a", "b", "c"], policies)
    assert set(router.restrict_precisions(("full",))) == {"a", MIXED}
    assert router.policies["a"] == router.policies[MIXED] == PLAIN
    assert router.policies["b"] == PLAIN and router.policies["c"] == policies["c"]


def test_add_items_while_routing_from_threads():
    router, _ = _router()
    errors = []

    def query() -> None:
        try:
            for _ in range(300):
                router.route(np.random.rand(4))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=query) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(40):
        router.add_items(np.array([[0, 0, 1, i / 40]], dtype=np.float32), ["a"])
    for t in threads:
        t.join()
    assert not errors and len(router) == 44
    assert router.route(np.array([0, 0, 1, 0.5])).label == "a"
    with pytest.raises(ValueError, match="no policy"):
        router.add_items(np.zeros((1, 4)), ["zzz"])


def _saved(tmp_path: Path, fingerprint: str = "abc") -> Path:
    router, anchors = _router()
    save_artifact(tmp_path, router, anchors, {"fingerprint": fingerprint}, {"note": "test"}, "native")
    return tmp_path


def test_artifact_round_trip(tmp_path):
    router = load_router(_saved(tmp_path), "abc")
    assert router.route(np.array([1.0, 0.05, 0, 0])).label == "a"
    assert router.policies == POLICIES
    assert not list(tmp_path.glob("*.pkl"))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("model", sorted(SHIPPED_ARTIFACTS))
def test_auto_index_is_the_artifact_shipped_for_the_model_and_target(model, target, default_model):
    directory = artifact_dir("auto", model, target)
    manifest = read_manifest(directory)
    made_for = manifest["model"]
    assert made_for["name"] == model and manifest["target"] == target
    expected = PACKAGED_MODELS[model].sha256[:32] if model in PACKAGED_MODELS else default_model[2].fingerprint
    assert made_for["fingerprint"] == expected  # the GGUF's own hash: the artifact fits the model it names
    router = load_router(directory, expected)
    if target == "native":  # no quantised copy there: every policy runs as calibrated, none is replaced
        assert router.restrict_precisions(("full",)) == {}
    assert artifact_dir("auto", "/some/other/model", target) is None and artifact_dir("none", model, target) is None


def test_artifact_for_another_model_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match=r"router\.json.*fingerprint"):
        load_router(_saved(tmp_path), "another-model")


@pytest.mark.parametrize("victim", ["index.hnsw", "anchors.safetensors"])
def test_missing_or_corrupted_files_are_named(tmp_path, victim):
    directory = _saved(tmp_path)
    path = directory / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"{victim}: corrupted"):
        load_router(directory, "abc")
    path.unlink()
    with pytest.raises(ArtifactError, match=rf"{victim}: file missing"):
        load_router(directory, "abc")


def test_broken_manifest(tmp_path):
    directory = _saved(tmp_path)
    (directory / "router.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"router\.json: corrupted"):
        load_router(directory, "abc")
    shutil.rmtree(directory)
    with pytest.raises(ArtifactError, match="file missing"):
        load_router(directory, "abc")


def test_calibration_end_to_end(tmp_path, default_model, default_engine):
    _, tokenizer, info = default_model
    files = {}
    for name, texts in {"math": ["What is 12 times 7?", "Add 15 and 27.", "Half of 90 is?"],
                        "german": ["Translate German to English: Guten Morgen!", "Translate German to English: Danke.",
                                   "Translate German to English: Wo ist der Bahnhof?"]}.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": t}]}) for t in texts))
        files[name] = read_domain_file(path, tokenizer)
    out = tmp_path / "artifact"
    config = CalibrationConfig(anchors_per_domain=2, search_prompts=2, holdout_prompts=1, tokens=8, budget=4,
                               confirm_tokens=12)
    report = calibrate(default_engine, info, files, out, config)
    router = load_router(out, info.fingerprint)
    assert sorted(router.policies) == ["german", "math", MIXED] and len(router) == 4
    for name in ("math", "german", MIXED):
        entry = report["domains"][name]
        assert entry["chosen"] in ("plain", "speculative") and entry["candidates"] >= 1
        assert {"expected_speedup", "policy", "search_s"} <= set(entry)
    mixed = report["domains"][MIXED]
    for name in ("math", "german"):  # a domain keeps its own policy only if it beats the mixed one by the margin
        entry = report["domains"][name]
        if mixed["chosen"] == "speculative":
            own_wins = entry["expected_speedup"] >= entry["mixed_expected_speedup"] * (1 + config.domain_margin)
            assert own_wins or entry["policy"] in (mixed["policy"], PLAIN.to_dict())
            if entry["policy"] not in (mixed["policy"], PLAIN.to_dict()):  # ... and measures no slower on held-out
                assert entry["measured_speedup"] >= entry["mixed_measured_speedup"]
            if entry.get("reason") == "no candidate expected to beat plain decoding":  # plain, a departure too:
                # mixed expected the margin below plain (or the domain's own policy, the margin above mixed, below it)
                bound = max(1 - config.domain_margin, 1 / (1 + config.domain_margin))
                assert entry["mixed_expected_speedup"] < bound + 5e-4  # the report rounds to 3 decimals
    manifest = json.loads((out / "router.json").read_text())
    assert manifest["report"]["costs"]["verify_ms"]["1"] > 0  # measured on this machine
    assert (manifest["report"]["tokens"], manifest["report"]["confirm_tokens"]) == (8, 12)
    assert manifest["model"]["fingerprint"] == info.fingerprint
    seq, _ = default_engine.start(files["german"][0], SamplingParams(max_tokens=1))
    assert router.route(seq.embedding.numpy()).label == "german"


GERMAN = ["Translate German to English: Guten Morgen!", "Translate German to English: Danke schön.",
          "Translate German to English: Wo ist der Bahnhof?", "Translate German to English: Ich habe Hunger."]
ARITHMETIC = ["What is 12 times 7?", "Add 15 and 27.", "What is 90 divided by 3?", "Subtract 8 from 50."]


def test_traffic_clusters_into_domains(default_engine):
    tokenizer = default_engine.tokenizer
    german, arithmetic = ([chat_ids(tokenizer, t) for t in texts] for texts in (GERMAN, ARITHMETIC))
    clusters = cluster_traffic(default_engine, german + arithmetic, clusters=2)
    assert sorted(map(sorted, clusters.values())) == sorted([sorted(german), sorted(arithmetic)])
    assert list(clusters) == ["traffic-1", "traffic-2"]
    assert cluster_traffic(default_engine, german[:3], clusters=4) == {"traffic-1": german[:3]}  # < 2 per cluster
    repeated = cluster_traffic(default_engine, german * 3 + arithmetic, clusters=2, max_prompts=6)
    assert sum(map(len, repeated.values())) == 6 and all(len(set(map(tuple, p))) == len(p) for p in repeated.values())


def test_calibrate_from_unlabelled_traffic(tmp_path, default_model, default_engine):
    """``knn-ssd calibrate --traffic``: a log of served prompts becomes a routing artifact, a domain per cluster."""
    traffic = tmp_path / "traffic.jsonl"
    traffic.write_text("".join(json.dumps({"messages": [{"role": "user", "content": t}]}) + "\n"
                               for t in GERMAN + ARITHMETIC))
    out = tmp_path / "artifact"
    assert main(["calibrate", "--traffic", str(traffic), "--clusters", "2", "--out", str(out), "--anchors", "2",
                 "--search-prompts", "2", "--holdout-prompts", "1", "--tokens", "8", "--budget", "3"]) == 0
    _, tokenizer, info = default_model
    router = load_router(out, info.fingerprint)
    assert sorted(router.policies) == [MIXED, "traffic-1", "traffic-2"]

    def label(text: str) -> str:
        seq, _ = default_engine.start(chat_ids(tokenizer, text), SamplingParams(max_tokens=1))
        return router.route(seq.embedding.numpy()).label

    assert {label("Translate German to English: Gute Nacht."), label("What is 6 times 9?")} == {"traffic-1",
                                                                                                "traffic-2"}


def test_draft_cost_model_reproduces_the_measured_full_draft():
    additive = fit_draft_cost(whole=40.0, no_attention=30.0, no_mlp=25.0, num_layers=30)
    assert additive.ms(30, SkipSet()) == pytest.approx(40.0)
    assert additive.ms(30, SkipSet(attention=range(30))) == pytest.approx(30.0)
    # Skipping everything of one kind saved more than its share (seen with int8 drafts): the full
    # draft must still cost what was measured, not the sum of the parts (which used to be 27.7 ms for 20).
    cache_bound = fit_draft_cost(whole=20.0, no_attention=4.8, no_mlp=7.5, num_layers=30)
    assert cache_bound.base == 0.0
    assert cache_bound.ms(30, SkipSet()) == pytest.approx(20.0)
    assert cache_bound.ms(30, SkipSet(attention=[3])) < 20.0
