"""Cheap policy search: teacher-forced draft agreement turned into an expected speedup (SWIFT-style).

For each search prompt the full model's greedy continuation is known. A candidate
draft runs once, in parallel, over that continuation (after the full model's
prompt KV), giving per position whether its top-1 matches the full model and how
confident it was. Simulating draft-and-verify over those arrays with the measured
step costs gives the expected speedup for any stop threshold and max draft. The tokens an n-gram
lookup would draft at each position (``decoding.lookup``) are known as well, so every candidate is
scored with and without lookup drafting, and lookup alone (no model draft) is a candidate too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from decoding import DraftPolicy, ModelRunner, Sequence, SkipSet
from decoding.lookup import lookup_min_ngram, ngram_lookup
from decoding.policy import MAX_DRAFT_LIMIT

from .costs import StepCosts

THRESHOLDS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9)
MAX_DRAFTS = (1, 2, 3, 4, 5, 8, 12)  # short ones for lookup drafts where a longer verify costs more


Arrays = list[tuple[np.ndarray, np.ndarray]]


@dataclass
class Candidate:
    """A (skip set, precision) with its best threshold / max draft / lookup and expected speedup."""

    skip: SkipSet
    precision: str
    expected: float = 0.0
    policy: DraftPolicy | None = None
    agreement: float = 0.0


@dataclass
class SearchResult:
    best: Candidate
    evaluated: list[Candidate] = field(default_factory=list)


def agreement(runner: ModelRunner, seqs: list[Sequence], skip: SkipSet, precision: str,
              ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per sequence: (draft top-1 == full model's token, draft top-1 probability) along the continuation."""
    policy = DraftPolicy(skip, precision=precision)
    out = []
    for seq in seqs:
        cont = seq.generated
        n = seq.prompt_len
        tokens = torch.tensor(cont[:-1], device=runner.device)
        logits = runner.forward(tokens, seq.cache, n, policy=policy, all_logits=True).logits
        probs = torch.softmax(logits, dim=-1)
        conf, top = probs.max(dim=-1)
        out.append(((top.cpu() == torch.tensor(cont[1:])).numpy(), conf.cpu().numpy()))
    return out


def lookups(seqs: list[Sequence], drafts_with_model: bool) -> Arrays:
    """Per sequence and position j of ``agreement``'s arrays: how many tokens an n-gram lookup drafts after
    the prompt and the continuation's first j + 1 tokens, and how many of them the continuation repeats
    (matches as short as the engine takes for a policy that does or does not draft with the model)."""
    out = []
    min_ngram = lookup_min_ngram(drafts_with_model)
    for seq in seqs:
        prompt, cont = seq.tokens[:seq.prompt_len], seq.generated
        drafted, matched = np.zeros(len(cont) - 1, dtype=np.int64), np.zeros(len(cont) - 1, dtype=np.int64)
        for j in range(len(cont) - 1):
            found = ngram_lookup(prompt + cont[:j + 1], MAX_DRAFT_LIMIT, min_ngram=min_ngram)
            drafted[j] = len(found)
            matched[j] = next((m for m, (a, b) in enumerate(zip(found, cont[j + 1:])) if a != b),
                              min(len(found), len(cont) - j - 1))
        out.append((drafted, matched))
    return out


def simulate(arrays: Arrays, threshold: float, max_draft: int, draft_ms: float, costs: StepCosts,
             looked_up: Arrays | None = None, model_drafts: bool = True) -> float:
    """Expected speedup over plain decoding of draft-and-verify along the teacher-forced arrays; with
    ``looked_up`` (``lookups``), a position where the lookup finds tokens drafts those instead (no draft
    forward); without ``model_drafts`` the other positions decode plainly."""
    tokens, ms = 0, 0.0
    for index, (agree, conf) in enumerate(arrays):
        i, n = 0, len(agree)
        while i < n:
            if looked_up is not None and looked_up[index][0][i]:
                drafted = min(int(looked_up[index][0][i]), max_draft, n - i)
                accepted = min(int(looked_up[index][1][i]), drafted)
                ms += costs.verify_ms(drafted + 1)
                tokens += accepted + 1
                i += accepted + 1
                continue
            if not model_drafts:
                ms, tokens, i = ms + costs.verify_ms(1), tokens + 1, i + 1
                continue
            drafted, accepted, matching = 0, 0, True
            for j in range(i, min(n, i + max_draft)):
                drafted += 1
                matching = matching and bool(agree[j])
                accepted += matching
                if conf[j] < threshold:
                    break
            ms += drafted * draft_ms + costs.verify_ms(drafted + 1)
            tokens += accepted + 1
            i += accepted + 1
    return (tokens / ms) * costs.forward_1 if ms else 0.0


def expected_speedup(runner: ModelRunner, seqs: list[Sequence], policy: DraftPolicy, costs: StepCosts) -> float:
    """Expected speedup of ``policy`` exactly as given (threshold, max draft and lookup too) on ``seqs``."""
    arrays = _arrays(runner, seqs, policy.skip, policy.precision)
    return simulate(arrays, policy.threshold, policy.max_draft, costs.draft_ms(policy), costs,
                    lookups(seqs, policy.drafts_with_model) if policy.lookup else None, policy.drafts_with_model)


def _arrays(runner: ModelRunner, seqs: list[Sequence], skip: SkipSet, precision: str) -> Arrays:
    """``agreement``, or for lookup alone (nothing skipped, full precision) placeholders of its length."""
    if precision == "full" and not len(skip):
        return [(np.zeros(len(s.generated) - 1, dtype=bool), np.zeros(len(s.generated) - 1)) for s in seqs]
    return agreement(runner, seqs, skip, precision)


def score(candidate: Candidate, arrays: Arrays, costs: StepCosts, looked_up: dict[bool, Arrays]) -> Candidate:
    """Fill in the best threshold / max draft / lookup of ``candidate`` and its expected speedup
    (``looked_up``: ``lookups`` for policies that draft with the model and for lookup alone)."""
    model = DraftPolicy(candidate.skip, precision=candidate.precision)
    draft_ms = costs.draft_ms(model)
    best = (-1.0, 0.0, 1, False)
    for lookup in (False, True) if model.drafts_with_model else (True,):
        for threshold in THRESHOLDS if model.drafts_with_model else (0.0,):
            for max_draft in MAX_DRAFTS:
                value = simulate(arrays, threshold, max_draft, draft_ms, costs,
                                 looked_up[model.drafts_with_model] if lookup else None, model.drafts_with_model)
                if value > best[0]:
                    best = (value, threshold, max_draft, lookup)
    candidate.expected = best[0]
    candidate.policy = DraftPolicy(candidate.skip, precision=candidate.precision, threshold=best[1],
                                   max_draft=best[2], lookup=best[3])
    candidate.agreement = float(np.mean(np.concatenate([a for a, _ in arrays])))
    return candidate


def _random_skip(rng: random.Random, num_layers: int, max_fraction: float) -> SkipSet:
    count = rng.randint(1, max(1, int(2 * num_layers * max_fraction)))
    slots = [(i, kind) for i in range(1, num_layers - 1) for kind in ("attention", "mlp")]
    chosen = rng.sample(slots, min(count, len(slots)))
    return SkipSet([i for i, k in chosen if k == "attention"], [i for i, k in chosen if k == "mlp"])


def _mutate(rng: random.Random, skip: SkipSet, num_layers: int) -> SkipSet:
    attention, mlp = set(skip.attention), set(skip.mlp)
    kind = rng.choice(("attention", "mlp"))
    target = attention if kind == "attention" else mlp
    move = rng.random()
    if target and move < 0.4:
        target.discard(rng.choice(sorted(target)))
    else:
        target.add(rng.randrange(1, num_layers - 1))
        if target and move > 0.8:
            target.discard(rng.choice(sorted(target)))
    return SkipSet(attention, mlp)


def search(runner: ModelRunner, seqs: list[Sequence], costs: StepCosts, budget: int, seed: int = 0,
           progress=None) -> SearchResult:
    """Random search then local refinement over skip sets, for each available draft precision."""
    rng = random.Random(seed)
    precisions = runner.draft_precisions
    evaluated: list[Candidate] = []
    seen: set = set()
    looked_up = {with_model: lookups(seqs, with_model) for with_model in (True, False)}

    def evaluate(skip: SkipSet, precision: str) -> None:
        key = (skip, precision)
        if key in seen:
            return
        seen.add(key)
        evaluated.append(score(Candidate(skip, precision), _arrays(runner, seqs, skip, precision), costs, looked_up))
        if progress is not None:
            progress.update(1)

    for precision in precisions:  # lookup alone ("full" with nothing skipped), each quantised copy as it is
        evaluate(SkipSet(), precision)
    n_random = max(1, budget // 2)
    while len(evaluated) < n_random:
        precision = rng.choice(precisions)
        evaluate(_random_skip(rng, runner.num_layers, 0.15 if precision == "int8" else 0.3), precision)
    attempts = 0
    while len(evaluated) < budget and attempts < budget * 5:
        attempts += 1
        parent = rng.choice(sorted(evaluated, key=lambda c: -c.expected)[:3])
        evaluate(_mutate(rng, parent.skip, runner.num_layers), parent.precision)
    best = max(evaluated, key=lambda c: c.expected)
    return SearchResult(best, evaluated)
