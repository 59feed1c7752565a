"""Log-probabilities (OpenAI's ``logprobs``): the full model's, identical under speculation, served in
OpenAI's chat and completions shapes."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import chat_ids
from openai import OpenAI

from decoding import PLAIN, DraftPolicy, SamplingParams, SkipSet, SpeculativeEngine
from decoding.batching import ContinuousBatcher
from decoding.prefix_cache import PrefixCache
from server.logprobs import LogprobFormatter

POLICIES = [DraftPolicy(precision="int8", threshold=0.0, max_draft=8),
            DraftPolicy(SkipSet(attention=[3, 9], mlp=[20]), threshold=0.5, max_draft=6)]


def _run(engine, ids, params, policy) -> list:
    """Every step's output of decoding one request alone."""
    return list(engine.generate(ids, params, policy))


def _run_batched(engine, requests, max_batched_tokens: int = 512) -> list[list]:
    """Every step's output of each request, all decoded together with continuous batching."""
    batcher = ContinuousBatcher(engine, max_batch_size=len(requests), max_batched_tokens=max_batched_tokens)
    seqs = []
    for ids, params, policy in requests:
        seqs.append(engine.admit(ids, params))
        seqs[-1].policy = policy
        batcher.add(seqs[-1])
    outputs: dict[int, list] = {id(seq): [] for seq in seqs}
    while batcher.size:
        for seq, out in batcher.step().outputs:
            outputs[id(seq)].append(out)
    return [outputs[id(seq)] for seq in seqs]


def test_speculative_logprobs_equal_plain_and_the_model(default_engine, default_model):
    """Every token's log-probability and top-5 under speculation are plain decoding's, bit for bit, and
    they are the model's own log-softmax at that position (checked against the transformers model)."""
    hf_model, tokenizer, _ = default_model
    params = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=5)
    for text, policy in zip(("Why is the sky blue?", "List three uses of copper."), POLICIES):
        ids = chat_ids(tokenizer, text)
        plain = [lp for out in _run(default_engine, ids, params, PLAIN) for lp in out.logprobs]
        spec_outputs = _run(default_engine, ids, params, policy)
        spec = [lp for out in spec_outputs for lp in out.logprobs]
        assert [lp.token_id for lp in spec] == [t for out in spec_outputs for t in out.token_ids]
        assert len(plain) == 24 and spec == plain
        tokens = [lp.token_id for lp in plain]
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids + tokens])).logits[0, len(ids) - 1:-1].float()
        reference = torch.log_softmax(logits, dim=-1)
        for i, lp in enumerate(plain):
            assert lp.logprob == pytest.approx(float(reference[i, lp.token_id]), abs=2e-4)
            top_ids = [t for t, _ in lp.top]
            assert len(top_ids) == 5 and top_ids[0] == lp.token_id  # greedy: the chosen token is the best
            assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
            assert set(top_ids) == set(torch.topk(reference[i], 5).indices.tolist())


def test_batched_and_sampled_rows_report_their_own_logprobs(default_engine):
    """In a batch every row gets the log-probabilities it gets alone; a sampled row's logprobs are those of
    the tokens it committed; rows that did not ask get none."""
    tok = default_engine.tokenizer
    requests = [(chat_ids(tok, "Name a red fruit."), SamplingParams(max_tokens=12, logprobs=2), POLICIES[0]),
                (chat_ids(tok, "Count to four."), SamplingParams(max_tokens=10), POLICIES[1]),
                (chat_ids(tok, "Say hello in French."), SamplingParams(max_tokens=9, temperature=0.8, seed=3,
                                                                      logprobs=0), POLICIES[0])]
    alone = [_run(default_engine, ids, params, policy) for ids, params, policy in requests]
    batched = _run_batched(default_engine, requests)
    assert all(out.logprobs is None for out in alone[1] + batched[1])
    for solo, together in zip((alone[0], alone[2]), (batched[0], batched[2])):
        assert [lp for out in together for lp in out.logprobs] == [lp for out in solo for lp in out.logprobs]
    sampled = [lp for out in alone[2] for lp in out.logprobs]
    assert [lp.token_id for lp in sampled] == [t for out in alone[2] for t in out.token_ids]
    assert all(lp.top == () and lp.logprob <= 0.0 for lp in sampled)


def test_prompt_logprobs_are_the_models_however_the_prompt_is_prefilled(default_engine, default_model):
    """Echo with logprobs: every prompt token after the first gets the model's log-probability, the same in
    one prefill chunk, in 7-token chunks beside another prompt, and with a prefix cache that holds the
    prompt (a sequence that needs its prompt's logits computes them instead of reading cached entries)."""
    hf_model, tokenizer, _ = default_model
    ids = chat_ids(tokenizer, "Explain photosynthesis to a ten-year-old in two sentences.")
    params = SamplingParams(max_tokens=3, prompt_logprobs=2)
    whole = _run(default_engine, ids, params, PLAIN)[0].prompt_logprobs
    other = (chat_ids(tokenizer, "Hi"), SamplingParams(max_tokens=3), PLAIN)
    chunked = _run_batched(default_engine, [other, (ids, params, PLAIN)], max_batched_tokens=7)[1]
    assert [out.prompt_logprobs for out in chunked if out.prompt_logprobs] == [whole]
    cached_engine = SpeculativeEngine(default_engine.runner, tokenizer, prefix_cache=PrefixCache(64 << 20))
    cached_engine.run(ids, SamplingParams(max_tokens=2), PLAIN)  # the prompt's blocks are now cached
    assert _run(cached_engine, ids, params, PLAIN)[0].prompt_logprobs == whole

    assert [lp.token_id for lp in whole] == ids and whole[0].logprob is None and whole[0].top == ()
    with torch.no_grad():
        reference = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    for i, lp in enumerate(whole[1:]):
        assert lp.logprob == pytest.approx(float(reference[i, lp.token_id]), abs=2e-4)
        assert len(lp.top) == 2 and lp.top[0][1] >= lp.logprob - 1e-6


def test_bad_logprobs_counts_are_refused():
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=-1)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)


def test_token_bytes_rebuild_text_exactly(default_engine):
    """A token may hold part of a character: its ``bytes`` still concatenate to the exact UTF-8 text."""
    fmt = LogprobFormatter(default_engine.tokenizer)
    text = "héllo — 日本語 🙂 done"
    ids = default_engine.tokenizer(text).input_ids
    assert bytes(b for t in ids for b in fmt.bytes(t)).decode("utf-8") == text
    assert any("\ufffd" in fmt.text(t) for t in ids)  # split characters show U+FFFD in the token's text


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused")


def test_chat_logprobs_through_the_openai_sdk(client, default_engine):
    """Routed speculative decoding on the server reports the same numbers as plain decoding here, in
    OpenAI's shape, streamed or not."""
    messages = [{"role": "user", "content": "Describe the water cycle in three steps."}]
    out = client.chat.completions.create(model="default", messages=messages, max_tokens=20, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert out.model_extra["knn_ssd"]["draft_tokens"] > 0  # speculation ran
    expected = [lp for step in _run(default_engine, chat_ids(default_engine.tokenizer, messages[0]["content"]),
                                    SamplingParams(max_tokens=20, logprobs=3), PLAIN) for lp in step.logprobs]
    assert [c.logprob for c in content] == [lp.logprob for lp in expected]
    assert [[t.logprob for t in c.top_logprobs] for c in content] == [[v for _, v in lp.top] for lp in expected]
    assert "".join(c.token for c in content) == out.choices[0].message.content
    assert bytes(b for c in content for b in c.bytes).decode() == out.choices[0].message.content
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token for c in content)

    stream = client.chat.completions.create(model="default", messages=messages, max_tokens=20, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True)
    streamed = [c for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for c in chunk.choices[0].logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]

    bare = client.chat.completions.create(model="default", messages=messages, max_tokens=4, temperature=0)
    assert bare.choices[0].logprobs is None


def test_completion_logprobs_through_the_openai_sdk(client):
    out = client.completions.create(model="default", prompt="The capital of France is", max_tokens=12,
                                    temperature=0, logprobs=2, stop=["\n\n"])
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text or out.choices[0].finish_reason == "stop"
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert all(math.isfinite(v) and v <= 0 for v in lp.token_logprobs)
    assert all(len(top) <= 2 and max(top.values()) >= v - 1e-6 for top, v in zip(lp.top_logprobs, lp.token_logprobs))


def test_echo_with_logprobs_scores_a_prompt_as_lm_eval_does(client, default_engine):
    """lm-eval-harness's loglikelihood request: echo, logprobs=1, max_tokens=1, token-id prompts."""
    tok = default_engine.tokenizer
    context, continuation = tok("The capital of France is").input_ids, tok(" Paris").input_ids
    prompt = context + continuation
    out = client.completions.create(model="default", prompt=[prompt], max_tokens=1, temperature=0, echo=True,
                                    logprobs=1)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(prompt) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = _run(default_engine, prompt, SamplingParams(max_tokens=1, prompt_logprobs=1), PLAIN)[0]
    assert lp.token_logprobs[1:len(prompt)] == [t.logprob for t in expected.prompt_logprobs[1:]]
    assert out.choices[0].text.startswith(tok.decode(prompt))
    continuation_logprob = sum(lp.token_logprobs[len(context):len(prompt)])
    assert -20 < continuation_logprob < 0

    stream = client.completions.create(model="default", prompt=[prompt], max_tokens=3, temperature=0, echo=True,
                                       logprobs=1, stream=True)
    chunks = [c.choices[0] for c in stream if c.choices]
    assert chunks[0].text.startswith(tok.decode(prompt)) and chunks[0].logprobs.token_logprobs[0] is None
    streamed = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
    assert streamed[1:len(prompt)] == lp.token_logprobs[1:len(prompt)]
    offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    assert offsets == sorted(offsets) and offsets[0] == 0
