"""`knn-ssd bench`: plain vs Self-SD Fix / Mix vs KNN-SSD vs oracle under domain shift, in one interleaved run.

Every prompt is decoded by every method back to back (plain first in the rotation as often as last),
so machine drift hits all methods alike. Methods that pick the same policy for a prompt share one
decoding of it (the same computation), KNN-SSD's time includes its router lookup. Every speculative
output is compared token by token with the plain one; a divergence is explained only by a near-tie
of the full model's top-1/top-2 logits in a low-precision dtype.
"""

from __future__ import annotations

import hashlib
import platform
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from decoding import PLAIN, DraftPolicy, ModelInfo, ModelRunner, SamplingParams, SpeculativeEngine
from decoding.divergence import TIE_ULPS, divergence

from .evaluate import chat_ids, spec_bench_by_domain
from .router import MIXED, Router

PLAIN_METHOD = "plain"
MIX_METHOD = "self_sd_mix"
KNN_METHOD = "knn_ssd"
ORACLE_METHOD = "oracle"
FIX_PREFIX = "self_sd_fix_"
BEST_FIX = "self_sd_fix"  # the Self-SD Fix variant with the best overall speedup
STREAMS = {"mixed": "shuffled mixed stream (mix ratio 1)", "task_by_task": "task-by-task stream (mix ratio 0)"}


@dataclass(frozen=True)
class BenchPrompt:
    domain: str
    text: str
    ids: list[int]


@dataclass
class Tally:
    """Summed decoding figures of one method over some prompts."""

    tokens: int = 0
    seconds: float = 0.0
    plain_seconds: float = 0.0  # plain decoding of the same prompts
    plain_tokens: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    step_tokens: int = 0
    verify_steps: int = 0
    prompts: int = 0

    def merge(self, other: "Tally") -> None:
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)

    def add(self, run: "Run", plain: "Run") -> None:
        self.tokens += run.tokens
        self.seconds += run.seconds
        self.plain_tokens += plain.tokens
        self.plain_seconds += plain.seconds
        self.draft_tokens += run.draft_tokens
        self.accepted_tokens += run.accepted_tokens
        self.step_tokens += run.step_tokens
        self.verify_steps += run.verify_steps
        self.prompts += 1

    def summary(self) -> dict[str, float]:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        plain_rate = self.plain_tokens / self.plain_seconds if self.plain_seconds else 0.0
        return {"speedup": rate / plain_rate if plain_rate else 0.0, "tokens_per_s": rate,
                "mean_accepted_tokens": self.step_tokens / self.verify_steps if self.verify_steps else 0.0,
                "acceptance_rate": self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0,
                "prompts": self.prompts, "tokens": self.tokens, "seconds": self.seconds}


@dataclass(frozen=True)
class Run:
    """One decoding of one prompt with one policy."""

    tokens: int
    seconds: float
    draft_tokens: int
    accepted_tokens: int
    step_tokens: int
    verify_steps: int
    output: tuple[int, ...]


@dataclass
class StreamResult:
    tallies: dict[str, dict[str, Tally]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(Tally)))
    compared: int = 0
    identical: int = 0
    divergences: list[dict[str, Any]] = field(default_factory=list)

    def headroom(self) -> dict[str, Any]:
        """Per domain, the best Self-SD Fix policy against Self-SD Mix: the most a router choosing among these
        policies per domain could win over one policy for all; and overall, every domain on its best one."""
        fixes = [m for m in self.tallies if m.startswith(FIX_PREFIX)]
        domains, best_all, mix_all = {}, Tally(), Tally()
        for domain, mix in sorted(self.tallies[MIX_METHOD].items()):
            best = max(fixes, key=lambda m: self.tallies[m][domain].summary()["speedup"])
            tally = self.tallies[best][domain]
            best_all.merge(tally)
            mix_all.merge(mix)
            best_speedup, mix_speedup = tally.summary()["speedup"], mix.summary()["speedup"]
            domains[domain] = {"best": best.removeprefix(FIX_PREFIX), "best_speedup": best_speedup,
                               "mix_speedup": mix_speedup, "headroom": best_speedup / mix_speedup}
        best_speedup, mix_speedup = best_all.summary()["speedup"], mix_all.summary()["speedup"]
        return {"domains": domains, "best_per_domain_speedup": best_speedup, "mix_speedup": mix_speedup,
                "headroom": best_speedup / mix_speedup}

    def methods(self) -> dict[str, Any]:
        out = {}
        for method, by_domain in self.tallies.items():
            overall = Tally()
            for tally in by_domain.values():
                overall.merge(tally)
            out[method] = {"overall": overall.summary(),
                           "domains": {d: t.summary() for d, t in sorted(by_domain.items())}}
        fixes = {m: r for m, r in out.items() if m.startswith(FIX_PREFIX)}
        if fixes:
            best = max(fixes, key=lambda m: fixes[m]["overall"]["speedup"])
            out[BEST_FIX] = {**fixes[best], "variant": best}
        return out


def split_prompts(path: Path, per_domain: int) -> dict[str, list[str]]:
    """Evaluation prompts: the odd positions of each domain in file order, ``per_domain`` spread evenly.

    The even positions are the calibration half (never evaluated), so calibrating on the same file
    (``knn-ssd calibrate`` with files made from the even positions) cannot leak into the benchmark.
    """
    out = {}
    for domain, texts in spec_bench_by_domain(path).items():
        held_out = texts[1::2]
        step = max(1, len(held_out) // per_domain)
        out[domain] = held_out[::step][:per_domain]
    return out


def stream_order(prompts: list[BenchPrompt], stream: str, seed: int) -> list[BenchPrompt]:
    """Task by task (grouped by domain) or a seeded shuffle of all domains."""
    if stream == "task_by_task":
        return sorted(prompts, key=lambda p: p.domain)
    shuffled = list(prompts)
    random.Random(seed).shuffle(shuffled)
    return shuffled


def headroom_policies(runner: ModelRunner) -> dict[str, DraftPolicy]:
    """``--headroom``'s extra Self-SD Fix policies: lookup drafts alone of 1 to 8 tokens, and each quantised
    draft copy the runner has with lookup first (the built-in policy where there is one)."""
    policies = {f"lookup {n}": DraftPolicy(lookup=True, max_draft=n) for n in (1, 2, 3, 4, 6, 8)}
    policies.update({f"{p} draft + lookup": DraftPolicy(precision=p, lookup=True) for p in runner.quantised_precisions})
    return policies


def method_policies(router: Router, domain: str, embedding: torch.Tensor, extra: dict[str, DraftPolicy],
                    ) -> tuple[dict[str, DraftPolicy], float, str]:
    """Each method's policy for one prompt (``extra``: more Self-SD Fix policies, by name), KNN-SSD's lookup
    seconds and its routed label."""
    route = router.route(embedding.float().cpu().numpy())
    policies = {PLAIN_METHOD: PLAIN, MIX_METHOD: router.policy_for(MIXED), KNN_METHOD: route.policy,
                ORACLE_METHOD: router.policies.get(domain, router.policy_for(MIXED))}
    for fixed in router.domains:
        if fixed != MIXED:
            policies[FIX_PREFIX + fixed] = router.policy_for(fixed)
    policies.update({FIX_PREFIX + name: policy for name, policy in extra.items()})
    return policies, route.lookup_ms / 1000, route.label


def decode(engine: SpeculativeEngine, ids: list[int], policy: DraftPolicy, params: SamplingParams,
           ) -> tuple[Run, torch.Tensor]:
    """One timed decoding (prefill included) and the prompt embedding its prefill computed."""
    t0 = time.perf_counter()
    seq = engine.run(ids, params, policy)
    seconds = time.perf_counter() - t0
    s = seq.stats
    return Run(len(seq.generated), seconds, s.draft_tokens, s.accepted_tokens, s.step_tokens, s.verify_steps,
               tuple(seq.generated)), seq.embedding


def run_stream(engine: SpeculativeEngine, router: Router, prompts: list[BenchPrompt], params: SamplingParams,
               progress: Callable[[], None], extra: dict[str, DraftPolicy],
               ) -> tuple[StreamResult, list[dict[str, Any]]]:
    """Decode every prompt with every method; returns the tallies and the per-prompt routing records."""
    result = StreamResult()
    routes = []
    distinct = list(dict.fromkeys([PLAIN, *router.policies.values(), *extra.values()]))  # every method's policy
    for i, prompt in enumerate(prompts):
        runs, embedding = {}, None
        for policy in distinct[i % len(distinct):] + distinct[:i % len(distinct)]:
            runs[policy], embedding = decode(engine, prompt.ids, policy, params)
        policies, lookup_s, label = method_policies(router, prompt.domain, embedding, extra)
        routes.append({"domain": prompt.domain, "label": label, "lookup_ms": lookup_s * 1000})
        plain = runs[PLAIN]
        for method, policy in policies.items():
            run = runs[policy]
            if method == KNN_METHOD:
                run = replace(run, seconds=run.seconds + lookup_s)
            result.tallies[method][prompt.domain].add(run, plain)
        for policy, run in runs.items():
            if policy.is_plain:
                continue
            methods = [m for m, p in policies.items() if p == policy]
            result.compared += len(methods)
            parted = divergence(engine, prompt.ids, plain.output, run.output)
            if parted is None:
                result.identical += len(methods)
                continue
            result.divergences.append({"domain": prompt.domain, "methods": methods, **parted,
                                       "prompt": prompt.text[:80]})
        progress()
    return result, routes


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_benchmark(engine: SpeculativeEngine, info: ModelInfo, router: Router, data: Path, per_domain: int,
                  max_new_tokens: int, seed: int, streams: list[str], stop_at_eos: bool = False,
                  headroom: bool = False) -> dict[str, Any]:
    """The whole benchmark; returns the report (see ``write_report`` for the files).

    Every output is ``max_new_tokens`` long (EOS ignored, as speculative decoding papers measure), or
    with ``stop_at_eos`` ends where the model ends it, as a server returns it. ``headroom`` adds
    ``headroom_policies`` as Self-SD Fix rows."""
    extra = headroom_policies(engine.runner) if headroom else {}
    texts = split_prompts(data, per_domain)
    prompts = [BenchPrompt(d, t, chat_ids(engine.tokenizer, t)) for d, ts in texts.items() for t in ts]
    params = SamplingParams(max_tokens=max_new_tokens, ignore_eos=not stop_at_eos)
    engine.run(prompts[0].ids, SamplingParams(max_tokens=4, ignore_eos=True), PLAIN)  # warm-up
    results: dict[str, StreamResult] = {}
    routes: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with tqdm(total=len(prompts) * len(streams), desc="bench", unit="prompt") as bar:
        for stream in streams:
            order = stream_order(prompts, stream, seed)
            results[stream], stream_routes = run_stream(engine, router, order, params, bar.update, extra)
            routes += stream_routes
    main = results[streams[0]]
    compared = sum(r.compared for r in results.values())
    identical = sum(r.identical for r in results.values())
    divergences = [d for r in results.values() for d in r.divergences]
    non_ties = sum(not d["near_tie"] for d in divergences)
    lookups = [r["lookup_ms"] for r in routes]
    hits = defaultdict(list)
    for r in routes[:len(prompts)]:
        hits[r["domain"]].append(r["label"] == r["domain"])
    return {
        "model": info.name, "device": info.device, "dtype": info.dtype, "target": engine.runner.target,
        "machine": machine(),
        "model_info": info.to_dict(),
        "max_new_tokens": max_new_tokens, "stop_at_eos": stop_at_eos, "prompts_per_domain": per_domain,
        "prompts": len(prompts), "domains": sorted(texts), "seed": seed,
        "data": str(data), "data_sha256": hashlib.sha256(Path(data).read_bytes()).hexdigest(),
        "lossless": non_ties == 0, "exact_match_rate": identical / compared if compared else 1.0,
        "divergences_at_non_ties": non_ties, "divergences": divergences,
        "tie_tolerance": ("0: the verify path is batch-invariant (native kernels), outputs must match"
                          if engine.runner.batch_invariant else
                          f"{TIE_ULPS} ulps of the dtype at the top-1 logit (0 in float32: outputs must match)"),
        "stream": streams[0], "methods": main.methods(), "headroom": main.headroom(),
        "streams": {s: {"description": STREAMS[s], "methods": r.methods()} for s, r in results.items()},
        "routing": {"accuracy": float(np.mean([h for hs in hits.values() for h in hs])),
                    "domains": {d: float(np.mean(h)) for d, h in sorted(hits.items())},
                    "lookup_ms_p50": float(np.percentile(lookups, 50)),
                    "lookup_ms_p99": float(np.percentile(lookups, 99))},
        "policies": {name: p.to_dict() for name, p in sorted(router.policies.items())},
        "extra_fix_policies": {name: p.to_dict() for name, p in extra.items()},
        "wall_s": time.perf_counter() - t0,
    }
