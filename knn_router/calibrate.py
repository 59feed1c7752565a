"""``knn-ssd calibrate``: prompt embeddings, anchors per domain, and a searched, confirmed policy per domain."""

from __future__ import annotations

import json
import logging
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.cluster import KMeans
from tqdm import tqdm

from decoding import (
    PLAIN,
    DraftPolicy,
    ModelInfo,
    SamplingParams,
    Sequence,
    SpeculativeEngine,
)

from .artifact import save_artifact
from .costs import StepCosts, measure_costs
from .router import MIXED, Router
from .search import expected_speedup, search

log = logging.getLogger(__name__)


@dataclass
class CalibrationConfig:
    anchors_per_domain: int = 10
    search_prompts: int = 8
    holdout_prompts: int = 4
    tokens: int = 32  # continuation tokens of each search prompt
    confirm_tokens: int | None = None  # tokens decoded per held-out prompt (None: ``tokens``)
    budget: int = 40
    k: int = 1
    similarity_threshold: float = 0.0
    seed: int = 0
    min_speedup: float = 1.0  # below this measured speedup a domain decodes plainly
    domain_margin: float = 0.03  # a domain keeps its own policy only if expected this much above mixed's

    @property
    def held_out_tokens(self) -> int:
        return self.confirm_tokens or self.tokens


def read_domain_file(path: Path, tokenizer: Any) -> list[list[int]]:
    """Token ids of each JSONL line: ``messages`` (and ``tools``, if any) through the chat template, raw
    ``prompt`` text or ``prompt_ids`` (the lines ``serve --log-prompts`` writes are of these kinds)."""
    prompts = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{n}: not valid JSON ({exc})") from exc
        if "messages" in row:
            ids = tokenizer.apply_chat_template(row["messages"], tools=row.get("tools"), add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
        elif "prompt" in row:
            ids = tokenizer(row["prompt"]).input_ids
        elif "prompt_ids" in row:
            ids = row["prompt_ids"]
        else:
            raise ValueError(f"{path}:{n}: each line needs 'prompt', 'prompt_ids' or 'messages'")
        prompts.append(list(ids))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def anchors_of(embeddings: np.ndarray, count: int, seed: int) -> np.ndarray:
    """KMeans centres of unit-normalised embeddings (every sample when there are fewer than ``count``)."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    if len(unit) <= count:
        return unit
    return KMeans(n_clusters=count, n_init=10, random_state=seed).fit(unit).cluster_centers_


def cluster_traffic(engine: SpeculativeEngine, prompts: list[list[int]], clusters: int, seed: int = 0,
                    min_size: int = 2, max_prompts: int | None = None) -> dict[str, list[list[int]]]:
    """Unlabelled prompts (real traffic) as calibration domains: KMeans on their prompt embeddings (unit
    vectors, the router's cosine space) into at most ``clusters`` groups of at least ``min_size`` prompts
    (fewer groups where a group would be smaller), named ``traffic-1``, ``traffic-2``, ... by size.
    Repeated prompts count once; beyond ``max_prompts`` a seeded random sample (in log order) is used."""
    prompts = [list(p) for p in dict.fromkeys(tuple(p) for p in prompts)]
    if max_prompts is not None and len(prompts) > max_prompts:
        keep = sorted(random.Random(seed).sample(range(len(prompts)), max_prompts))
        prompts = [prompts[i] for i in keep]
    if not prompts:
        raise ValueError("no traffic prompts to cluster")
    embed = SamplingParams(max_tokens=1, ignore_eos=True)  # prefill only: the embedding
    vectors = np.stack([engine.run(ids, embed, PLAIN).embedding.float().cpu().numpy()
                        for ids in tqdm(prompts, desc="embed traffic", unit="prompt")])
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = np.zeros(len(prompts), dtype=int)
    for k in range(min(clusters, len(prompts) // min_size), 1, -1):
        candidate = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(unit)
        if np.bincount(candidate).min() >= min_size:
            labels = candidate
            break
    by_size = sorted(set(labels.tolist()), key=lambda c: (-int((labels == c).sum()), c))
    return {f"traffic-{rank}": [prompts[i] for i in np.flatnonzero(labels == c)]
            for rank, c in enumerate(by_size, 1)}


def search_split(num_prompts: int, config: CalibrationConfig) -> int:
    """How many of a domain's prompts (the first ones) the policy search uses; the held-out ones follow."""
    return min(config.search_prompts, max(1, num_prompts - config.holdout_prompts))


def confirm(engine: SpeculativeEngine, prompts: list[list[int]], policies: list[DraftPolicy],
            tokens: int) -> list[dict[str, float]]:
    """Real decoding on held-out prompts: decode tokens/s of each policy over plain, interleaved per prompt."""
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    plain_t, plain_n = 0.0, 0
    totals = [[0.0, 0, 0, 0, 0] for _ in policies]  # seconds, tokens, drafts, accepted, steps
    for ids in prompts:
        plain = engine.run(ids, params, PLAIN).stats
        plain_t, plain_n = plain_t + plain.decode_s, plain_n + plain.step_tokens
        for total, policy in zip(totals, policies):
            spec = engine.run(ids, params, policy).stats
            for i, value in enumerate((spec.decode_s, spec.step_tokens, spec.draft_tokens, spec.accepted_tokens,
                                       spec.verify_steps)):
                total[i] += value
    return [{"measured_speedup": (n / t) / (plain_n / plain_t),
             "acceptance_rate": accepted / drafts if drafts else 0.0,
             "mean_accepted_tokens": n / steps if steps else 0.0} for t, n, drafts, accepted, steps in totals]


def _policy_for(engine: SpeculativeEngine, name: str, search_seqs: list[Sequence], holdout: list[list[int]],
                costs: StepCosts, config: CalibrationConfig,
                mixed: DraftPolicy | None = None) -> tuple[DraftPolicy, dict[str, Any]]:
    """Search, confirm, and fall back to plain decoding when speculation does not pay here.

    With ``mixed`` (the policy tuned on all domains), the domain keeps its own policy
    only if it is expected to beat ``mixed`` on this domain's prompts by
    ``config.domain_margin`` and then measures at least as fast as ``mixed`` on the
    held-out prompts: a domain-specific policy must earn its place, so the router
    never routes to a policy that is no better than the fallback. Plain decoding is a
    departure too: a domain leaves ``mixed`` for it only where ``mixed`` is expected (and
    measured) that margin below plain, not on a near tie a few prompts decide (lookup
    drafts that find nothing cost nothing, and pay on the copy-heavy prompts a small
    calibration set may lack).
    """
    def floor(chosen: DraftPolicy) -> float:  # leaving the mixed policy for plain needs the margin too
        return config.min_speedup * (1 - config.domain_margin) if chosen == mixed else config.min_speedup

    t0 = time.perf_counter()
    with tqdm(total=config.budget, desc=f"search {name}", unit="cand", leave=False) as bar:
        result = search(engine.runner, search_seqs, costs, config.budget, seed=config.seed, progress=bar)
    best = result.best
    report: dict[str, Any] = {"candidates": len(result.evaluated), "expected_speedup": round(best.expected, 3),
                              "draft_agreement": round(best.agreement, 3), "searched_policy": best.policy.to_dict()}
    policy, expected, reason = best.policy, best.expected, None
    if mixed is not None and not mixed.is_plain:
        mixed_expected = expected_speedup(engine.runner, search_seqs, mixed, costs)
        report["mixed_expected_speedup"] = round(mixed_expected, 3)
        if best.expected < mixed_expected * (1 + config.domain_margin):
            policy, expected = mixed, mixed_expected
            reason = f"own policy not expected to beat the mixed policy by {config.domain_margin:.0%} here"
    if expected < floor(policy):
        policy, reason = PLAIN, "no candidate expected to beat plain decoding"
    else:
        rival = mixed if mixed is not None and not mixed.is_plain and policy != mixed else None
        measured, *rival_measured = confirm(engine, holdout, [policy] + ([rival] if rival else []),
                                            config.held_out_tokens)
        if rival_measured:
            report["mixed_measured_speedup"] = round(rival_measured[0]["measured_speedup"], 3)
            if measured["measured_speedup"] < rival_measured[0]["measured_speedup"]:
                report["own_measured_speedup"] = round(measured["measured_speedup"], 3)
                policy, measured = rival, rival_measured[0]
                reason = "own policy measured slower than the mixed policy on held-out prompts"
        report.update({k: round(v, 3) for k, v in measured.items()})
        if measured["measured_speedup"] < floor(policy):
            policy, reason = PLAIN, "speculation measured slower than plain decoding on held-out prompts"
    report.update({"chosen": "plain" if policy.is_plain else "speculative", "policy": policy.to_dict(),
                   "search_s": round(time.perf_counter() - t0, 1)})
    if reason:
        report["reason"] = reason
    return policy, report


def calibrate(engine: SpeculativeEngine, info: ModelInfo, domains: dict[str, list[list[int]]], out: Path,
              config: CalibrationConfig) -> dict[str, Any]:
    """Calibrate every domain and write the artifact to ``out``; returns the report."""
    t_start = time.perf_counter()
    costs = measure_costs(engine.runner)
    log.info("step costs (ms): 1-token %.1f, 13-token verify %.1f", costs.forward_1, costs.verify_ms(13))
    continued = SamplingParams(max_tokens=config.tokens, ignore_eos=True)
    embedded = SamplingParams(max_tokens=1, ignore_eos=True)  # prefill only: the embedding, for the anchors
    splits = {name: search_split(len(prompts), config) for name, prompts in domains.items()}
    seqs: dict[str, list[Sequence]] = {}
    total = sum(len(p) for p in domains.values())
    with tqdm(total=total, desc="embed (+ continue search prompts)", unit="prompt") as bar:
        for name, prompts in domains.items():
            seqs[name] = []
            for i, ids in enumerate(prompts):
                seqs[name].append(engine.run(ids, continued if i < splits[name] else embedded, PLAIN))
                bar.update(1)
    # Mix is tuned on the union: every domain's search and held-out prompts (one prompt per domain, as
    # before, let a few continuations decide between policies within a few percent of each other)
    holdouts = {name: prompts[splits[name]:splits[name] + config.holdout_prompts] or prompts[:1]
                for name, prompts in domains.items()}
    mixed_search = [s for name in domains for s in seqs[name][:splits[name]]]
    mixed_holdout = [p for name in domains for p in holdouts[name]]
    policies, report = {}, {}
    policies[MIXED], report[MIXED] = _policy_for(engine, MIXED, mixed_search, mixed_holdout, costs, config)
    anchors, labels = [], []
    for name, prompts in tqdm(domains.items(), desc="domains", unit="domain"):
        emb = np.stack([s.embedding.float().cpu().numpy() for s in seqs[name]])
        centres = anchors_of(emb, config.anchors_per_domain, config.seed)
        anchors.append(centres)
        labels += [name] * len(centres)
        split, holdout = splits[name], holdouts[name]
        policies[name], report[name] = _policy_for(engine, name, seqs[name][:split], holdout, costs, config,
                                                   mixed=policies[MIXED])
        report[name].update({"prompts": len(prompts), "anchors": len(centres), "search_prompts": split,
                             "holdout_prompts": len(holdout)})
    anchor_matrix = np.concatenate(anchors).astype(np.float32)
    router = Router(anchor_matrix, labels, policies, k=config.k, threshold=config.similarity_threshold)
    full_report = {
        "domains": report, "costs": costs.to_dict(),
        "tokens": config.tokens, "confirm_tokens": config.held_out_tokens,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "device": info.device,
                    "dtype": info.dtype},
        "calibration_s": round(time.perf_counter() - t_start, 1),
    }
    model = {k: getattr(info, k) for k in ("name", "architecture", "num_layers", "hidden_size", "fingerprint")}
    save_artifact(out, router, anchor_matrix, model, full_report, target=engine.runner.target)
    return full_report
