"""Speculative sampling keeps the target distribution (unseeded rows: the rejection rule, checked by
chi-squared tests that also catch a wrong rule); seeded rows give plain decoding's very tokens."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from scipy.stats import chi2_contingency

import decoding.engine
from decoding import PLAIN, DraftPolicy, SamplingParams, SkipSet
from decoding.grammar import json_schema_grammar

N = 600
PROMPT = [5, 17, 300, 42, 9, 77]
# Drops most of the model: the draft distribution differs clearly from the target's.
DRAFT = DraftPolicy(SkipSet(attention=[0, 1, 2], mlp=[0, 1, 3]), threshold=0.0, max_draft=3)


def _samples(engine, policy, **adjust) -> Counter:
    """Joint distribution of the 2nd and 3rd generated tokens (both produced by verify steps) over N unseeded
    runs (each request's generator comes from torch's global RNG, fixed here so the test repeats)."""
    torch.manual_seed(0)
    counts: Counter = Counter()
    for _ in range(N):
        params = SamplingParams(max_tokens=3, temperature=1.0, top_k=4, ignore_eos=True, **adjust)
        counts[tuple(engine.run(PROMPT, params, policy).generated[1:])] += 1
    return counts


def _p_value(a: Counter, b: Counter) -> float:
    cells = sorted(set(a) | set(b))
    table = [[a[c] + 0.5 for c in cells], [b[c] + 0.5 for c in cells]]
    return chi2_contingency(table).pvalue


def _always_accept(drafts, draft_probs, target, gen):
    """Deliberately wrong: keeps every draft, so output follows the draft's distribution."""
    return len(drafts), decoding.sampling.sample(target[len(drafts)], gen)


@pytest.fixture(scope="module")
def plain_counts(tiny_engine):
    return _samples(tiny_engine, PLAIN)


def test_speculative_sampling_matches_plain_sampling(tiny_engine, plain_counts):
    assert _p_value(plain_counts, _samples(tiny_engine, DRAFT)) > 0.01


def test_speculative_sampling_keeps_the_penalised_distribution(tiny_engine, plain_counts):
    """Three tokens biased into the top 4 everywhere (this model's top logits are ~6-7), penalised each time
    they are used: the 3rd token's distribution depends on the 1st and 2nd, drafted or not."""
    penalties = {"frequency_penalty": 1.5, "presence_penalty": 0.5, "logit_bias": ((100, 6.0), (200, 6.0), (300, 6.0))}
    plain = _samples(tiny_engine, PLAIN, **penalties)
    assert _p_value(plain, plain_counts) < 1e-4  # they change the distribution
    # a draft accepted ~87% of the time here, so the 3rd token often comes from a verify row after a draft
    close_draft = DraftPolicy(SkipSet(attention=[3]), threshold=0.0, max_draft=3)
    assert _p_value(plain, _samples(tiny_engine, close_draft, **penalties)) > 0.01


def test_speculative_sampling_keeps_the_constrained_distribution(tiny_engine):
    """Under a grammar (a JSON array of integers) what may follow depends on the tokens before, drafted
    or not: verify rows must be masked for the state after the drafts before them."""
    grammar = {"grammar": json_schema_grammar({"type": "array", "items": {"type": "integer"}, "minItems": 2})}
    close_draft = DraftPolicy(SkipSet(attention=[3]), threshold=0.0, max_draft=3)
    assert _p_value(_samples(tiny_engine, PLAIN, **grammar), _samples(tiny_engine, close_draft, **grammar)) > 0.01


@pytest.mark.parametrize("adjust", [{}, {"frequency_penalty": 1.0, "logit_bias": ((100, 4.0),)},
                                    {"grammar": json_schema_grammar({"type": "array", "items": {"type": "integer"}})}],
                         ids=["plain", "penalised", "grammar"])
def test_seeded_sampling_gives_plain_decodings_tokens(tiny_engine, adjust):
    """A seeded row draws each position's token with Gumbel noise its seed fixes for that position, drafts
    included, and keeps only drafts those draws confirm: the output is plain decoding's, whatever the policy."""
    for seed in range(40):
        params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=seed, **adjust)
        plain = tiny_engine.run(PROMPT, params, PLAIN).generated
        for policy in (DRAFT, DraftPolicy(SkipSet(attention=[3]), threshold=0.0, max_draft=4)):
            assert tiny_engine.run(PROMPT, params, policy).generated == plain


def test_wrong_acceptance_rule_is_detected(tiny_engine, plain_counts, monkeypatch):
    monkeypatch.setattr(decoding.engine, "accept_sampled", _always_accept)
    assert _p_value(plain_counts, _samples(tiny_engine, DRAFT)) < 1e-4


def test_same_seed_same_text(tiny_engine):
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=1234, ignore_eos=True)
    assert tiny_engine.run(PROMPT, params, DRAFT).generated == tiny_engine.run(PROMPT, params, DRAFT).generated
