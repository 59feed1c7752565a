"""Decoding micro- and macro-benchmark: forward latencies and plain vs speculative tokens/s."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .engine import SpeculativeEngine
from .policy import PLAIN, DraftPolicy, SkipSet
from .runner import ModelRunner
from .sampling import SamplingParams
from .timing import ForwardTimers, interleaved_median_ms

SPEC_BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "spec_bench" / "question.jsonl"


def spec_bench_prompts(path: Path, count: int) -> list[tuple[str, str]]:
    """(category, first turn) of ``count`` Spec-Bench questions spread evenly over the file."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    step = max(1, len(rows) // count)
    return [(r["category"], r["turns"][0]) for r in rows[::step][:count]]


def evenly_skipped(num_layers: int, fraction: float) -> SkipSet:
    """A skip set dropping ``fraction`` of all sub-layers, spread over the middle-to-late layers."""
    count = round(2 * num_layers * fraction)
    slots = [(i, kind) for i in range(1, num_layers - 1) for kind in ("mlp", "attention")]
    chosen = slots[:: max(1, len(slots) // max(count, 1))][:count]
    return SkipSet([i for i, k in chosen if k == "attention"], [i for i, k in chosen if k == "mlp"])


def forward_latencies(runner: ModelRunner, context: int = 256, rounds: int = 9,
                      repeats: int = 5) -> dict[str, float]:
    """Median ms of 1-token and k-token full forwards and of draft forwards, at ``context`` cached tokens,
    timed in interleaved rounds (see ``interleaved_median_ms``; 9 rounds, as one slow spell of a shared VM
    skewed a ratio with 5)."""
    forwards = ForwardTimers(runner, context)
    timers: dict[str, Callable[[], Any]] = {"forward_1": forwards.timer(1)}
    for k in (2, 4, 8, 12):
        timers[f"verify_{k}"] = forwards.timer(k)
    drafts = {"draft_skip25": DraftPolicy(evenly_skipped(runner.num_layers, 0.25)),
              "draft_skip50": DraftPolicy(evenly_skipped(runner.num_layers, 0.5))}
    for precision in runner.quantised_precisions:
        drafts[f"draft_{precision}"] = DraftPolicy(precision=precision)
        drafts[f"draft_{precision}_skip25"] = DraftPolicy(evenly_skipped(runner.num_layers, 0.25), precision=precision)
    for name, policy in drafts.items():
        timers[name] = forwards.timer(1, policy)
    return interleaved_median_ms(timers, rounds, repeats)


def decode_throughput(engine: SpeculativeEngine, prompts: list[list[int]], policy: DraftPolicy,
                      max_new_tokens: int, hf_generate: bool = False) -> dict[str, Any]:
    """Plain and speculative tokens/s over ``prompts`` (interleaved per prompt), plus transformers' generate.

    ``tokens_per_s`` counts each request from its start (the prompt's prefill included, as a client sees
    it); ``decode_tokens_per_s`` counts the time after prefill only, the part speculation changes."""
    params = SamplingParams(max_tokens=max_new_tokens, ignore_eos=True)
    totals = {"plain": [0, 0.0], "speculative": [0, 0.0], "transformers": [0, 0.0]}
    decode_s = {"plain": 0.0, "speculative": 0.0}
    identical, accepted, steps = 0, 0, 0
    for ids in tqdm(prompts, desc="decoding", unit="prompt"):
        runs = {}
        for name, pol in (("plain", PLAIN), ("speculative", policy)):
            t0 = time.perf_counter()
            seq = engine.run(ids, params, pol)
            totals[name][0] += len(seq.generated)
            elapsed = time.perf_counter() - t0
            totals[name][1] += elapsed
            decode_s[name] += elapsed - seq.stats.prefill_s
            runs[name] = seq
        identical += runs["plain"].generated == runs["speculative"].generated
        accepted += runs["speculative"].stats.step_tokens
        steps += runs["speculative"].stats.verify_steps
        if hf_generate:
            t0 = time.perf_counter()
            with torch.no_grad():
                engine.runner.model.generate(torch.tensor([ids], device=engine.runner.device),
                                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                             do_sample=False)
            totals["transformers"][0] += max_new_tokens
            totals["transformers"][1] += time.perf_counter() - t0
    rates = {name: n / s for name, (n, s) in totals.items() if s > 0}
    decode_rates = {name: totals[name][0] / s for name, s in decode_s.items()}
    return {
        "prompts": len(prompts), "max_new_tokens": max_new_tokens,
        "tokens_per_s": rates,
        "speedup_vs_plain": rates["speculative"] / rates["plain"],
        "decode_tokens_per_s": decode_rates,
        "decode_speedup_vs_plain": decode_rates["speculative"] / decode_rates["plain"],
        "plain_vs_transformers": rates["plain"] / rates["transformers"] if "transformers" in rates else None,
        "mean_accepted_tokens": accepted / steps if steps else 0.0,
        "identical_outputs": f"{identical}/{len(prompts)}",
        "policy": policy.to_dict(),
    }
