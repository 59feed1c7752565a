"""Routing accuracy on a domain-labelled prompt set, and router lookup latency at scale."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from decoding import DraftPolicy, SamplingParams, SpeculativeEngine

from .router import MIXED, Router

# Spec-Bench categories -> knn-ssd domains (the eight MT-bench categories form "chat")
SPEC_BENCH_DOMAINS = {"translation": "translation", "summarization": "summarization", "qa": "qa",
                      "math_reasoning": "math_reasoning", "rag": "rag"}


def spec_bench_by_domain(path: Path) -> dict[str, list[str]]:
    """First turns of Spec-Bench questions grouped by knn-ssd domain, in file order."""
    out: dict[str, list[str]] = defaultdict(list)
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out[SPEC_BENCH_DOMAINS.get(row["category"], "chat")].append(row["turns"][0])
    return dict(out)


def chat_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def routing_accuracy(engine: SpeculativeEngine, router: Router, prompts: dict[str, list[str]]) -> dict:
    """Share of prompts routed to their own domain, overall and per domain, with lookup latency."""
    hits: dict[str, list[bool]] = defaultdict(list)
    lookups = []
    todo = [(d, t) for d, texts in prompts.items() for t in texts]
    for domain, text in tqdm(todo, desc="routing", unit="prompt"):
        seq, _ = engine.start(chat_ids(engine.tokenizer, text), SamplingParams(max_tokens=1))
        result = router.route(seq.embedding.float().cpu().numpy())
        hits[domain].append(result.label == domain)
        lookups.append(result.lookup_ms)
    every = [h for hs in hits.values() for h in hs]
    return {"accuracy": float(np.mean(every)), "prompts": len(every),
            "domains": {d: {"accuracy": float(np.mean(h)), "prompts": len(h)} for d, h in sorted(hits.items())},
            "lookup_ms_p50": float(np.percentile(lookups, 50)), "lookup_ms_p99": float(np.percentile(lookups, 99))}


def lookup_latency(anchors: int = 10_000, dim: int = 576, queries: int = 2000, k: int = 1, seed: int = 0,
                   clusters: int = 60) -> dict:
    """p50/p99 of ``Router.route`` with ``anchors`` synthetic anchors in ``dim`` dimensions.

    Anchors and queries are drawn around ``clusters`` random centres, as calibrated
    anchors cluster by domain (uniformly random vectors are HNSW's worst case).
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)

    def around(n: int) -> np.ndarray:
        return (centres[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, dim))).astype(np.float32)

    vectors = around(anchors)
    labels = [f"d{i % 10}" for i in range(anchors)]
    policies = {name: DraftPolicy() for name in set(labels) | {MIXED}}
    router = Router(vectors, labels, policies, k=k)
    qs = around(queries)
    times = [router.route(q).lookup_ms for q in qs]
    return {"anchors": anchors, "dim": dim, "queries": queries, "k": k, "clusters": clusters,
            "p50_ms": statistics.median(times), "p99_ms": float(np.percentile(times, 99))}
