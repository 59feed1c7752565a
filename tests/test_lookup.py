"""Drafts by n-gram lookup (prompt lookup decoding, OpenAI's predicted outputs): where they come from, and
that they never change the output (greedy: identical to plain decoding; sampling: the same distribution)."""

from __future__ import annotations

import pytest
from conftest import chat_ids
from test_sampling import PROMPT, _always_accept, _p_value, _samples

import decoding.engine
from decoding import PLAIN, DraftPolicy, SamplingParams, SkipSet
from decoding.batching import generate_batch
from decoding.grammar import json_schema_grammar
from decoding.lookup import lookup_min_ngram, ngram_lookup, prediction_matches
from knn_router.costs import DraftCost, StepCosts
from knn_router.search import expected_speedup

ARTICLE = ("Summarize: The city council approved the new bicycle lane plan on Tuesday. The plan adds twelve "
           "kilometres of protected lanes along the river. The council said the bicycle lane plan will cost four "
           "million euros and open next spring.")
LOOKUP_POLICIES = [DraftPolicy(lookup=True), DraftPolicy(precision="int4", lookup=True),
                   DraftPolicy(SkipSet([3], [5]), precision="int8", threshold=0.3, max_draft=6, lookup=True)]


def test_lookup_takes_the_latest_longest_match():
    context = [1, 2, 3, 4, 9, 1, 2, 3, 4, 7, 8, 0, 1, 2, 3, 4]
    assert ngram_lookup(context, 2) == [7, 8]  # the latest earlier occurrence of [1, 2, 3, 4]
    assert ngram_lookup(context, 10) == [7, 8, 0, 1, 2, 3, 4]  # up to the end of the context
    assert ngram_lookup([5, 6, 7, 5, 6, 8, 1, 5, 6, 7], 3) == [5, 6, 8]  # a 3-token match, not the 2-token one
    assert ngram_lookup([1, 2, 3, 4, 5], 4) == []  # nothing repeats
    assert ngram_lookup([1, 2, 9, 1, 2], 4) == []  # 2-token matches are too short where the model drafts
    assert ngram_lookup(context, 3, reference=[2, 3, 4, 42, 43]) == [42, 43]  # the prediction first
    assert ngram_lookup(context, 0) == []


def test_lookup_alone_drafts_from_short_matches_a_token_past_their_length():
    """Where nothing else drafts, a 2-token match drafts up to 3 tokens and a 1-token match up to 2; 3+ token
    matches draft up to the limit as before."""
    assert lookup_min_ngram(drafts_with_model=True) == 3 and lookup_min_ngram(drafts_with_model=False) == 1
    assert ngram_lookup([1, 2, 9, 8, 7, 6, 1, 2], 8, min_ngram=1) == [9, 8, 7]
    assert ngram_lookup([5, 9, 8, 7, 6, 5], 8, min_ngram=1) == [9, 8]
    assert ngram_lookup([5, 9, 8, 7, 6, 5], 1, min_ngram=1) == [9]  # the limit still caps
    assert ngram_lookup([1, 2, 3, 4, 5, 6, 7, 1, 2, 3], 8, min_ngram=1) == [4, 5, 6, 7, 1, 2, 3]
    assert ngram_lookup([1, 2, 3, 4], 8, min_ngram=1) == []  # nothing repeats


@pytest.mark.parametrize("text", [ARTICLE, "Repeat exactly: red green blue, red green blue, red green blue."])
def test_lookup_drafts_keep_greedy_output(default_engine, text):
    ids = chat_ids(default_engine.tokenizer, text)
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    plain = default_engine.run(ids, params, PLAIN).generated
    for policy in LOOKUP_POLICIES:
        seq = default_engine.run(ids, params, policy)
        assert seq.generated == plain
        assert seq.stats.lookup_tokens > 0 and seq.stats.accepted_tokens > 0


def test_prediction_matches_counts_the_predicted_tokens_the_output_keeps_in_order():
    assert prediction_matches([1, 2, 3, 4, 5], [1, 2, 9, 4, 5, 6]) == 4  # 3 replaced by 9
    assert prediction_matches([1, 2, 3], [3, 2, 1]) == 1
    assert prediction_matches([], [1]) == 0 == prediction_matches([1], [])


def test_a_prediction_of_the_output_is_drafted_and_accepted(default_engine):
    """OpenAI's predicted outputs: given the text it will write, lookup alone verifies it in big steps."""
    ids = chat_ids(default_engine.tokenizer, "Write a sentence about the sea.")
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    plain = default_engine.run(ids, params, PLAIN)
    predicted = default_engine.run(ids, SamplingParams(max_tokens=40, ignore_eos=True, prediction=plain.generated),
                                   DraftPolicy(lookup=True, max_draft=16))
    assert predicted.generated == plain.generated
    assert predicted.stats.verify_steps <= 8 < plain.stats.verify_steps  # ~16 tokens a step once it matches
    assert (predicted.stats.accepted_prediction_tokens, predicted.stats.rejected_prediction_tokens) == (40, 0)


def test_lookup_under_a_grammar_and_in_a_batch_equals_plain_alone(default_engine):
    tok = default_engine.tokenizer
    schema = json_schema_grammar({"type": "object", "properties": {"summary": {"type": "string", "maxLength": 120}},
                                  "required": ["summary"], "additionalProperties": False})
    requests = [(chat_ids(tok, ARTICLE + " Answer in JSON."), SamplingParams(max_tokens=50, grammar=schema),
                 LOOKUP_POLICIES[1]),
                (chat_ids(tok, ARTICLE), SamplingParams(max_tokens=30, ignore_eos=True), LOOKUP_POLICIES[0]),
                (chat_ids(tok, ARTICLE), SamplingParams(max_tokens=30, ignore_eos=True), LOOKUP_POLICIES[2]),
                (chat_ids(tok, "Name three rivers."), SamplingParams(max_tokens=20), DraftPolicy(precision="int4"))]
    alone = [default_engine.run(*r).generated for r in requests]
    assert alone[1] == default_engine.run(requests[1][0], requests[1][1], PLAIN).generated
    batched = generate_batch(default_engine, requests, max_batch_size=4)
    assert [s.generated for s in batched] == alone


def _prediction_after_prompt(engine) -> tuple[int, ...]:
    """A prediction holding, for each likely first token c, ``PROMPT[-2:] + [c]`` and then the two tokens
    greedy decoding writes after c: the 2nd and 3rd tokens are drafted by lookup whatever c is sampled."""
    firsts = {engine.run(PROMPT, SamplingParams(max_tokens=1, temperature=1.0, top_k=4, seed=s), PLAIN).generated[0]
              for s in range(40)}
    prediction = []
    for c in sorted(firsts):
        after = engine.run(PROMPT + [c], SamplingParams(max_tokens=2, ignore_eos=True), PLAIN).generated
        prediction += [*PROMPT[-2:], c, *after]
    return tuple(prediction)


def test_lookup_drafts_keep_the_sampled_distribution(tiny_engine, monkeypatch):
    """Lookup drafts are a function of the tokens so far (a point mass for speculative sampling): the
    2nd and 3rd tokens keep plain sampling's joint distribution, and a wrong acceptance rule shows."""
    prediction = _prediction_after_prompt(tiny_engine)
    lookup = DraftPolicy(lookup=True, max_draft=3)
    plain = _samples(tiny_engine, PLAIN)
    drafted = _samples(tiny_engine, lookup, prediction=prediction)
    assert _p_value(plain, drafted) > 0.01
    monkeypatch.setattr(decoding.engine, "accept_sampled", _always_accept)
    assert _p_value(plain, _samples(tiny_engine, lookup, prediction=prediction)) < 1e-4


def test_the_search_simulates_lookup_drafting_as_the_engine_runs_it(default_engine):
    """With every forward costing the same, the search's expected speedup of lookup alone is its tokens per
    full-model step, which greedy decoding with that policy then shows exactly."""
    ids = chat_ids(default_engine.tokenizer, ARTICLE)
    seq = default_engine.run(ids, SamplingParams(max_tokens=40, ignore_eos=True), PLAIN)
    flat = StepCosts(verify={1: 1.0}, draft={"full": DraftCost(1.0, 0.0, 0.0)}, num_layers=30)
    policy = DraftPolicy(lookup=True, max_draft=8)
    expected = expected_speedup(default_engine.runner, [seq], policy, flat)
    run = default_engine.run(ids, SamplingParams(max_tokens=40, ignore_eos=True), policy).stats
    assert expected == pytest.approx(run.step_tokens / run.verify_steps)  # 39 tokens in 29 steps
    assert run.lookup_tokens > 0 and expected > 1.2
