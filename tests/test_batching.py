"""Continuous batching: every row's output equals the same request decoded alone (fp32, greedy and seeded)."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest
import torch
from conftest import chat_ids
from test_server_metrics import scrape, total

from decoding import PLAIN, DraftPolicy, SamplingParams, SkipSet
from decoding.adaptive import (
    HingeCost,
    SpeculationPlanner,
    StepCosts,
    expected_accepted,
    token_acceptance,
)
from decoding.batching import ContinuousBatcher, generate_batch
from decoding.detokenizer import StopMatcher
from decoding.grammar import json_schema_grammar
from decoding.stats import RequestStats
from server.bench_serve import bench_serve, plot

TEXTS = ["Translate to English: Guten Morgen, wie geht es dir heute?", "What is the capital of France?",
         "Write a haiku about rain.", "Explain photosynthesis in two sentences.", "List three prime numbers.",
         "Tell me a joke about cats.", "What is 17 times 3?", "Name the planets of the solar system."]
POLICIES = [PLAIN, DraftPolicy(precision="int8"), DraftPolicy(SkipSet([3, 5, 7], [4, 9]), precision="full"),
            DraftPolicy(SkipSet([2], [20]), precision="int8", threshold=0.3, max_draft=6)]
# verify cost grows steeply with tokens: speculation never pays in a batch -> cap 0
EXPENSIVE_VERIFY = StepCosts(verify=HingeCost(0.04, 0.004, 0.05),
                             drafts=dict.fromkeys(("int8", "int4"), HingeCost(0.01, c=0.01)), num_layers=30)
# verify costs the same whatever the tokens and int8 drafts are nearly free: int8 rows draft fully -> uncapped
FREE_VERIFY = StepCosts(verify=HingeCost(0.04), drafts=dict.fromkeys(("int8", "int4"), HingeCost(0.0001)),
                        num_layers=30)


def mixed_requests(tokenizer, long_prompt: bool = True) -> list[tuple[list[int], SamplingParams, DraftPolicy]]:
    requests = []
    for i, text in enumerate(TEXTS):
        stop = (".",) if i == 3 else ()
        requests.append((chat_ids(tokenizer, text),
                         SamplingParams(max_tokens=12 + 3 * i, ignore_eos=i % 2 == 0, stop=stop), POLICIES[i % 4]))
    if long_prompt:  # longer than the token budget below: prefilled in chunks across steps
        requests.append((chat_ids(tokenizer, "Summarize this: " + "The river rose after the storm. " * 40),
                         SamplingParams(max_tokens=10), DraftPolicy(precision="int4")))  # a 4-bit draft group
    return requests


def solo_outputs(engine, requests) -> list[list[int]]:
    return [engine.run(ids, params, policy).generated for ids, params, policy in requests]


def test_batched_mixed_rows_equal_solo(default_engine):
    requests = mixed_requests(default_engine.tokenizer)
    solo = solo_outputs(default_engine, requests)
    batched = generate_batch(default_engine, requests, max_batch_size=4, max_batched_tokens=64)
    assert [s.generated for s in batched] == solo
    assert [s.finish_reason for s in batched] == [default_engine.run(*r).finish_reason for r in requests]


def test_rows_with_grammars_penalties_and_logprobs_equal_solo(default_engine):
    """Per-row state (a grammar's matcher, penalty counts, logprob requests) never leaks between rows: a
    batch of constrained, penalised and plain rows under different draft policies gives each row its
    solo output."""
    schema = json_schema_grammar({"type": "object", "properties": {"answer": {"type": "string", "maxLength": 40}},
                                  "required": ["answer"], "additionalProperties": False})
    variants = [{"grammar": schema}, {"presence_penalty": 0.7, "frequency_penalty": 0.5, "logprobs": 2},
                {"logit_bias": ((13, -100.0),)}, {"grammar": json_schema_grammar({"type": "object"})}]
    requests = [(chat_ids(default_engine.tokenizer, text), SamplingParams(max_tokens=40, **variants[i % 4]),
                 POLICIES[(i + 1) % 4]) for i, text in enumerate(TEXTS)]
    batched = generate_batch(default_engine, requests, max_batch_size=8, max_batched_tokens=64)
    assert [s.generated for s in batched] == solo_outputs(default_engine, requests)
    assert sum(s.stats.accepted_tokens for s in batched) > 0


def test_load_adaptive_draft_cap_keeps_greedy_output(default_engine):
    requests = mixed_requests(default_engine.tokenizer, long_prompt=False)
    solo = solo_outputs(default_engine, requests)
    drafted = {}
    for name, planner in (("capped", SpeculationPlanner(EXPENSIVE_VERIFY)), ("uncapped", None)):
        batched = generate_batch(default_engine, requests, max_batch_size=8, planner=planner)
        assert [s.generated for s in batched] == solo, name
        drafted[name] = sum(s.stats.draft_tokens for s in batched)
    assert drafted["capped"] < drafted["uncapped"] / 2  # only the last rows, once alone, drafted


def test_planner_choice_follows_costs(default_engine):
    seqs = []
    for ids, params, policy in mixed_requests(default_engine.tokenizer, long_prompt=False):
        seq = default_engine.admit(ids, params)
        seq.policy = policy
        seqs.append(seq)
    assert SpeculationPlanner(EXPENSIVE_VERIFY).cap(seqs) == 0
    int8_rows = [seq for seq in seqs if seq.policy.precision == "int8"]
    assert SpeculationPlanner(FREE_VERIFY).cap(int8_rows) is None
    # while requests wait for prefill a row drafts one token at most: the choice is 0 or 1
    assert SpeculationPlanner(FREE_VERIFY).cap(int8_rows, most=1) == 1
    assert SpeculationPlanner(EXPENSIVE_VERIFY).cap(seqs, most=1) == 0
    assert SpeculationPlanner(EXPENSIVE_VERIFY).cap(seqs[1:2]) is None  # a lone row decodes as calibrated


def test_planner_trims_drafts_to_what_pays(default_engine):
    """Once drafts are known, the planner verifies the likeliest tokens first, as many as the verify's cost pays
    for: all of them where verification is free, fewer as it grows steeper, and never a row's later draft
    without its earlier ones."""
    seqs = [default_engine.admit(chat_ids(default_engine.tokenizer, text), SamplingParams()) for text in TEXTS[:3]]
    for seq in seqs:
        seq.policy = DraftPolicy(lookup=True, max_draft=6)
    seqs[0].stats = RequestStats(accepted_tokens=60, draft_rejections=2)  # drafts almost always accepted (0.95)
    seqs[1].stats = RequestStats(accepted_tokens=1, draft_rejections=20)  # rarely (0.15)
    drafted = [5, 2, 0]
    assert SpeculationPlanner(FREE_VERIFY).trim(seqs, drafted) == drafted
    # a token costing a quarter of the step: worth it only while a draft is near-certain (0.95 ** 4 = 0.81)
    assert SpeculationPlanner(EXPENSIVE_VERIFY).trim(seqs, drafted) == [4, 0, 0]
    # each verified token costs 5% of a step: a ~0.95-acceptance row's drafts pay, a ~0.15 one's do not
    linear = StepCosts(verify=HingeCost(0.06, c=0.003), drafts={}, num_layers=30)
    assert SpeculationPlanner(linear).trim(seqs, drafted) == [5, 0, 0]
    # a lone row's lookup drafts are trimmed as any row's; its model drafts verify as calibrated
    assert SpeculationPlanner(EXPENSIVE_VERIFY).trim(seqs[:1], [5]) == [5]  # alone, all five still pay
    assert SpeculationPlanner(EXPENSIVE_VERIFY).trim(seqs[1:2], [2]) == [0]
    seqs[1].policy = DraftPolicy(precision="int8", lookup=True, max_draft=6)
    assert SpeculationPlanner(EXPENSIVE_VERIFY).trim(seqs[1:2], [2]) == [2]
    seqs[1].policy = DraftPolicy(lookup=True, max_draft=6)
    assert SpeculationPlanner(EXPENSIVE_VERIFY).cap(seqs) is None  # lookup drafts cost nothing to make
    # a row verified whole (a sampled model draft) keeps its drafts and its cost counts for the others
    assert SpeculationPlanner(FREE_VERIFY).trim(seqs, drafted, [False, True, False]) == drafted
    assert SpeculationPlanner(EXPENSIVE_VERIFY).trim(seqs, [2, 5, 0], [False, True, False]) == [2, 5, 0]
    assert SpeculationPlanner(EXPENSIVE_VERIFY).trim(seqs, [5, 5, 0], [True, False, False]) == [5, 0, 0]


def test_lone_lookup_row_trimmed_keeps_output_and_keeps_scoring_its_drafts(default_engine):
    """A lone lookup-only row whose drafts the planner leaves unverified decodes as plain decoding does, and
    the first token of each unverified draft is scored against the step's own token (its acceptance estimate
    keeps moving, so drafts that start to pay come back)."""
    request = (chat_ids(default_engine.tokenizer, "Repeat exactly: " + "red green blue " * 12),
               SamplingParams(max_tokens=40, ignore_eos=True), DraftPolicy(lookup=True, max_draft=6))
    expensive = StepCosts(verify=HingeCost(0.04, c=1.0), drafts={}, num_layers=30)  # no draft ever pays
    [row] = generate_batch(default_engine, [request], max_batch_size=1, planner=SpeculationPlanner(expensive))
    assert row.generated == default_engine.run(request[0], request[1], PLAIN).generated
    assert row.stats.draft_tokens == 0
    assert row.unverified_hits > 0  # the copy's lookups are right: scored, though none was verified
    [free] = generate_batch(default_engine, [request], max_batch_size=1, planner=SpeculationPlanner(FREE_VERIFY))
    assert free.generated == row.generated and free.stats.accepted_tokens > 0
    assert free.unverified_hits + free.unverified_misses == 0


def test_step_cost_fit_finds_where_forwards_turn_compute_bound():
    """Flat while the weights' read dominates, steep after: the fit recovers the knee a line would miss."""
    rows = [b for b in (1, 2, 4, 8, 16) for _ in (0, 2, 4, 8)]
    tokens = [b * (k + 1) for b in (1, 2, 4, 8, 16) for k in (0, 2, 4, 8)]
    true = HingeCost(0.25, 0.001, 0.0005, 0.02, knee=12)
    fit = HingeCost.fit(rows, tokens, [true(r, t) for r, t in zip(rows, tokens)])
    assert fit.knee == 12
    for r, t in ((8, 8), (8, 16), (8, 104), (3, 39)):
        assert fit(r, t) == pytest.approx(true(r, t), abs=1e-9)


def test_planner_acceptance_model_is_geometric():
    assert expected_accepted(0.5, 0) == 0.0
    assert expected_accepted(0.5, 3) == pytest.approx(0.5 + 0.25 + 0.125)
    assert expected_accepted(1.0, 4) == 4.0
    assert token_acceptance(RequestStats()) == pytest.approx(0.7)  # the prior
    # 18 accepted drafts, 2 rejections: close to 18 / 20 once the prior is outweighed
    assert token_acceptance(RequestStats(accepted_tokens=18, draft_rejections=2)) == pytest.approx(20.8 / 24)
    # unverified drafts' first tokens count as one-token trials
    assert token_acceptance(RequestStats(), hits=1, misses=3) == pytest.approx(3.8 / 8)


class FailingStops(StopMatcher):
    """A stop matcher that raises at its ``fail_at``-th token: a fault inside one row's commit."""

    def __init__(self, fail_at: int) -> None:
        super().__init__(())
        self.fail_at, self.seen = fail_at, 0

    def add(self, delta: str) -> bool:
        self.seen += 1
        if self.seen == self.fail_at:
            raise RuntimeError("injected fault")
        return super().add(delta)


def test_a_failing_row_fails_alone_and_the_others_lose_nothing(default_engine):
    """A row that raises while committing (its first token in a shared prefill, or mid-way in a shared
    decode step) gets its error once; every other row streams each of its tokens exactly once and ends with
    its solo output (no row is stepped twice when the batch is retried)."""
    requests = mixed_requests(default_engine.tokenizer, long_prompt=False)[:6]
    faults = {1: 6, 2: 1}  # row -> the token at which it fails
    batcher = ContinuousBatcher(default_engine, max_batch_size=8, max_batched_tokens=512)
    seqs = []
    for i, (ids, params, policy) in enumerate(requests):
        seq = default_engine.admit(ids, params)
        seq.policy = policy
        if i in faults:
            seq.stopper = FailingStops(faults[i])
        batcher.add(seq)
        seqs.append(seq)
    streamed: dict[int, list] = {id(seq): [] for seq in seqs}
    while batcher.size:
        for seq, out in batcher.step().outputs:
            streamed[id(seq)].append(out)
    solo = solo_outputs(default_engine, requests)
    for i, seq in enumerate(seqs):
        outs = streamed[id(seq)]
        if i in faults:
            assert isinstance(outs[-1], RuntimeError) and not any(isinstance(o, Exception) for o in outs[:-1])
        else:
            assert [t for out in outs for t in out.token_ids] == seq.generated == solo[i]
            assert outs[-1].finish_reason is not None


def test_cut_drafts_verifies_at_once_and_keeps_every_output(default_engine):
    """A waiting request cuts drafting short: every row, seeded sampling included, verifies after one draft,
    and no output changes (a seeded row's tokens are its positions' own draws)."""
    tok = default_engine.tokenizer
    seeded = (chat_ids(tok, TEXTS[2]), SamplingParams(max_tokens=16, temperature=0.8, seed=7),
              DraftPolicy(precision="int8", threshold=0.0, max_draft=4))
    requests = mixed_requests(tok, long_prompt=False)[:4] + [seeded]
    batcher = ContinuousBatcher(default_engine, max_batch_size=8)
    seqs = []
    for ids, params, policy in requests:
        seq = default_engine.admit(ids, params)
        seq.policy = policy
        batcher.add(seq)
        seqs.append(seq)
    while batcher.size:
        batcher.step(cut_drafts=lambda: True)
    assert [s.generated for s in seqs] == solo_outputs(default_engine, requests)
    for seq in seqs:
        assert seq.stats.draft_tokens <= seq.stats.draft_steps  # at most one draft per step
    assert seqs[1].stats.draft_steps > 0 and seqs[4].stats.draft_steps > 0  # the int8 rows did speculate


def test_seeded_sampling_rows_same_alone_and_in_batch(default_engine):
    tok = default_engine.tokenizer
    sampled = [(chat_ids(tok, text), SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=100 + i),
                POLICIES[(i + 1) % 4]) for i, text in enumerate(TEXTS[:4])]
    greedy = mixed_requests(tok, long_prompt=False)[4:]
    alone = solo_outputs(default_engine, sampled)
    batch = generate_batch(default_engine, sampled + greedy, max_batch_size=8,
                           planner=SpeculationPlanner(EXPENSIVE_VERIFY))
    assert [s.generated for s in batch[:4]] == alone
    assert [s.generated for s in batch[4:]] == solo_outputs(default_engine, greedy)


def test_chunked_prefill_gives_the_same_tokens_and_embedding(default_engine):
    ids, params, policy = mixed_requests(default_engine.tokenizer)[-1]
    whole = default_engine.run(ids, params, policy)
    batcher = ContinuousBatcher(default_engine, max_batch_size=1, max_batched_tokens=50)
    seq = default_engine.admit(ids, params)
    seq.policy = policy
    batcher.add(seq)
    steps = 0
    while batcher.size:
        batcher.step()
        steps += 1
    assert steps > len(ids) // 50  # the prompt really went in several chunks
    assert seq.generated == whole.generated
    assert torch.allclose(seq.embedding, whole.embedding, atol=1e-5)


def test_server_batches_concurrent_requests(server):
    before = scrape(server.url)

    def complete(text: str) -> str:
        body = {"model": "default", "prompt": text, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        return httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        together = list(pool.map(complete, TEXTS[:6]))
    after = scrape(server.url)
    steps = total(after, "knn_ssd_batch_size_count") - total(before, "knn_ssd_batch_size_count")
    rows = total(after, "knn_ssd_batch_size_sum") - total(before, "knn_ssd_batch_size_sum")
    assert rows / steps > 1.5  # steps advanced several requests at once
    assert together == [complete(text) for text in TEXTS[:6]]  # the same text as alone


def test_bench_serve_runs_each_mode_in_both_orders(server, tmp_path):
    """``bench-serve --rounds 2``: every level runs speculative, plain, plain, speculative; figures summed;
    ``--plot`` draws them."""
    report = bench_serve(server.url, "default", TEXTS, levels=[1, 2], requests_per_client=1, max_tokens=8,
                         ramp_s=0.0, modes=("speculative", "plain"), rounds=2)
    plot(report, tmp_path / "serve.png")
    assert (tmp_path / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["rounds"] == 2 and [(r["clients"], r["mode"]) for r in report["levels"]] == [
        (1, "speculative"), (1, "plain"), (2, "speculative"), (2, "plain")]
    for r in report["levels"]:
        assert r["runs"] == 2 and r["requests"] == 2 * r["clients"] and r["tokens"] == 8 * r["requests"]
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["wall_s"])
        assert len(r["run_tokens_per_s"]) == 2 and min(r["run_tokens_per_s"]) <= r["tokens_per_s"] <= max(
            r["run_tokens_per_s"])
    assert all("vs_plain" in r for r in report["levels"] if r["mode"] == "speculative")


def test_bench_serve_peer_requests_carry_openai_fields_only():
    """``--modes peer`` (another OpenAI-compatible server, e.g. llama-server): no knn-ssd field, and the
    peer's prompt cache off so it prefills every prompt as knn-ssd does with ``--prefix-cache-mb 0``."""
    from server.bench_serve import request_body

    peer = request_body("m", "hi", 8, "peer")
    assert "speculate" not in peer and peer["cache_prompt"] is False and peer["ignore_eos"] is True
    assert request_body("m", "hi", 8, "plain")["speculate"] is False
    assert request_body("m", "hi", 8, "speculative")["speculate"] is True
