"""Automatic prefix caching: exact reuse of prefilled KV entries, LRU memory bound, chunk-invariant prefill."""

from __future__ import annotations

import pytest
import torch
from conftest import chat_ids

from decoding import PLAIN, DraftPolicy, SamplingParams, SpeculativeEngine
from decoding.kv_cache import KVCache
from decoding.prefix_cache import PrefixCache

QUESTIONS = ["Name three rivers in Europe.", "What is the boiling point of water at sea level?",
             "Write a haiku about autumn leaves."]


def _filled_cache(tokens: int) -> KVCache:
    cache = KVCache(num_layers=2, kv_heads=1, head_dim=4, capacity=tokens, dtype=torch.float32,
                    device=torch.device("cpu"))
    cache.keys.normal_()
    cache.values.normal_()
    cache.commit(tokens)
    return cache


def _insert(store: PrefixCache, tokens: list[int]) -> int:
    blocks = len(tokens) // store.block_tokens
    return store.insert(tokens, _filled_cache(len(tokens)), [torch.zeros(3, dtype=torch.float64)] * blocks)


def test_match_walks_whole_blocks_from_the_start_within_the_limit():
    store = PrefixCache(1 << 20, block_tokens=4)
    assert _insert(store, list(range(10))) == 2  # two whole blocks; the partial third is not cached
    assert len(store.match(list(range(12)), limit=12)) == 2
    assert len(store.match(list(range(12)), limit=7)) == 1  # the limit keeps the last prompt token uncached
    assert store.match([0, 1, 2, 9, 4, 5, 6, 7], limit=8) == []  # differs in the first block
    assert len(store.match([0, 1, 2, 3, 9, 9, 9, 9], limit=8)) == 1
    assert _insert(store, list(range(8))) == 0  # already there


def test_lru_eviction_keeps_memory_bounded_and_evicts_leaves_before_their_parents():
    probe = PrefixCache(1 << 20, block_tokens=4)
    _insert(probe, list(range(4)))
    block_bytes = probe.nbytes
    store = PrefixCache(3 * block_bytes, block_tokens=4)
    _insert(store, list(range(12)))  # chain a -> b -> c
    assert len(store) == 3 and store.nbytes == 3 * block_bytes
    _insert(store, [50, 51, 52, 53])  # a fourth block: the least recently used leaf (c) goes
    assert len(store) == 3 and store.nbytes <= store.capacity_bytes
    assert len(store.match(list(range(12)), limit=12)) == 2  # a and b still reachable
    store.clear()
    assert len(store) == 0 and store.nbytes == 0


@pytest.fixture(scope="module")
def cached_engine(default_engine) -> SpeculativeEngine:
    return SpeculativeEngine(default_engine.runner, default_engine.tokenizer, prefix_cache=PrefixCache(64 << 20))


@pytest.mark.parametrize("policy", [PLAIN, DraftPolicy(precision="int8")], ids=["plain", "int8-draft"])
def test_cached_prefix_gives_the_same_tokens_kv_entries_and_embedding(default_engine, cached_engine, policy):
    tok = default_engine.tokenizer
    cached_engine.prefix_cache.clear()
    prompts = [chat_ids(tok, q) for q in QUESTIONS]
    prompts.append(prompts[0] + chat_ids(tok, "And three in Asia?")[1:])  # a longer prompt extending the first
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    hits = []
    for ids in prompts:
        fresh, reused = default_engine.run(ids, params, policy), cached_engine.run(ids, params, policy)
        assert reused.generated == fresh.generated
        n = fresh.prompt_len
        assert torch.equal(reused.cache.keys[..., :n, :], fresh.cache.keys[..., :n, :])
        assert torch.equal(reused.cache.values[..., :n, :], fresh.cache.values[..., :n, :])
        assert torch.equal(reused.embedding, fresh.embedding)
        hits.append(reused.stats.cached_tokens)
    assert hits[0] == 0  # empty cache
    assert all(h >= 16 for h in hits[1:3])  # the chat template's system prompt is shared
    assert hits[3] >= (len(prompts[0]) // 16) * 16  # the whole first prompt's blocks


def test_chunked_prefill_writes_the_same_kv_entries_as_one_prefill(default_engine):
    ids = chat_ids(default_engine.tokenizer, "Explain how a rainbow forms, step by step.")
    params = SamplingParams(max_tokens=1)
    whole = default_engine.admit(ids, params)
    default_engine.prefill([(whole, whole.prompt_len)])
    chunked = default_engine.admit(ids, params)
    for count in (17, 1, len(ids) - 18):  # a one-token chunk too
        default_engine.prefill([(chunked, count)])
    n = len(ids)
    assert torch.equal(chunked.cache.keys[..., :n, :], whole.cache.keys[..., :n, :])
    assert torch.equal(chunked.embedding, whole.embedding)
    assert chunked.generated == whole.generated


def test_a_prompt_reuses_blocks_another_prompt_prefilled_after_both_were_admitted(default_engine, cached_engine):
    tok = default_engine.tokenizer
    cached_engine.prefix_cache.clear()
    sections = " ".join(f"Section {i}: figures rose by {i}%." for i in range(20))
    system = "You answer questions about this report. " + sections

    def prompt(question: str) -> list[int]:
        ids = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": question}],
                                      add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)

    params = SamplingParams(max_tokens=12, ignore_eos=True)
    first, second = prompt("Which section rose most?"), prompt("Summarize section 3.")
    a, b = cached_engine.admit(first, params), cached_engine.admit(second, params)  # a burst: nothing cached yet
    while a.prefill_remaining:  # chunked, as under a token budget
        cached_engine.prefill([(a, min(32, a.prefill_remaining))])
    cached_engine.prefill([(b, b.prefill_remaining)])
    shared = next(i for i, (x, y) in enumerate(zip(first, second)) if x != y)
    assert b.stats.cached_tokens == shared // 16 * 16 and shared >= 160
    for seq, ids in ((a, first), (b, second)):
        while not seq.finished:
            cached_engine.step(seq)
        fresh = default_engine.run(ids, params)
        assert seq.generated == fresh.generated
        assert torch.equal(seq.cache.keys[..., :len(ids), :], fresh.cache.keys[..., :len(ids), :])
        assert torch.equal(seq.embedding, fresh.embedding)


def test_choices_of_one_prompt_prefill_it_once_in_a_batch(default_engine, cached_engine):
    from decoding.batching import generate_batch

    cached_engine.prefix_cache.clear()
    ids = chat_ids(default_engine.tokenizer, "Describe the water cycle in detail, from evaporation to rain.")
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    seqs = generate_batch(cached_engine, [(ids, params, PLAIN)] * 3, max_batched_tokens=24)
    fresh = default_engine.run(ids, params)
    assert all(seq.generated == fresh.generated for seq in seqs)
    cacheable = (len(ids) - 1) // 16 * 16
    assert seqs[0].stats.cached_tokens == 0
    assert [seq.stats.cached_tokens for seq in seqs[1:]] == [cacheable, cacheable]


def test_engine_takes_the_block_size_of_its_prefix_cache(default_engine):
    """A fresh (empty) cache still sets the engine's block size: 8-token blocks serve 8-token multiples."""
    engine = SpeculativeEngine(default_engine.runner, default_engine.tokenizer,
                               prefix_cache=PrefixCache(16 << 20, block_tokens=8))
    assert engine.block_tokens == 8
    ids = chat_ids(default_engine.tokenizer, "Name three rivers in Europe.")
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    first, second = engine.run(ids, params), engine.run(ids, params)
    assert second.generated == first.generated
    assert second.stats.cached_tokens == ((len(ids) - 1) // 8) * 8
