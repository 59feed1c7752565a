"""OpenAI's presence/frequency penalties and logit_bias: applied alike to drafts and verification, so
speculative decoding stays exactly plain decoding of the adjusted distribution."""

from __future__ import annotations

import pytest
import torch
from conftest import chat_ids
from openai import OpenAI

from decoding import PLAIN, DraftPolicy, SamplingParams, SkipSet
from decoding.sampling import adjusted_logits

POLICIES = [DraftPolicy(precision="int8", threshold=0.0, max_draft=8),
            DraftPolicy(SkipSet(attention=[3, 9], mlp=[20]), threshold=0.3, max_draft=6)]


def _reference_greedy(hf_model, ids: list[int], params: SamplingParams, steps: int) -> list[int]:
    """Greedy decoding by transformers' own forward over the whole text, with OpenAI's adjustment
    written out: logit + bias - frequency * count - presence * [count > 0], counting generated tokens."""
    out: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids + out])).logits[0, -1].float()
        for token, bias in params.logit_bias:
            logits[token] += bias
        for token in set(out):
            logits[token] -= params.frequency_penalty * out.count(token) + params.presence_penalty
        out.append(int(logits.argmax()))
    return out


def test_penalised_greedy_speculation_equals_plain_and_transformers(default_engine, default_model):
    hf_model, tok, _ = default_model
    ids = chat_ids(tok, "Write a list of ten fruits, one per line.")
    free = default_engine.run(ids, SamplingParams(max_tokens=24, ignore_eos=True), PLAIN).generated
    params = SamplingParams(max_tokens=24, ignore_eos=True, presence_penalty=0.8, frequency_penalty=0.6,
                            logit_bias=((free[0], -100.0), (tok(" banana").input_ids[0], 2.0)))
    plain = default_engine.run(ids, params, PLAIN).generated
    assert plain != free and free[0] not in plain
    assert plain == _reference_greedy(hf_model, ids, params, 24)
    for policy in POLICIES:
        seq = default_engine.run(ids, params, policy)
        assert seq.generated == plain and seq.stats.accepted_tokens > 0


def test_a_large_bias_forces_a_token(default_engine):
    token = default_engine.tokenizer(" yes").input_ids[0]
    params = SamplingParams(max_tokens=6, ignore_eos=True, logit_bias=((token, 100.0),))
    ids = chat_ids(default_engine.tokenizer, "Say something.")
    assert default_engine.run(ids, params, POLICIES[0]).generated == [token] * 6


def test_verify_rows_count_the_drafts_before_them():
    """Row i of a verify step follows the committed tokens and drafts[:i]."""
    params = SamplingParams(frequency_penalty=1.0, presence_penalty=0.5)
    rows = adjusted_logits(torch.zeros(3, 5), params, generated=[1, 1], appended=[2, 1])
    assert rows.tolist() == [[0, -2.5, 0, 0, 0], [0, -2.5, -1.5, 0, 0], [0, -3.5, -1.5, 0, 0]]
    assert adjusted_logits(torch.zeros(1, 5), SamplingParams(), [1]).tolist() == [[0] * 5]


def test_bad_penalties_are_refused(default_engine):
    with pytest.raises(ValueError, match="presence_penalty"):
        SamplingParams(presence_penalty=2.5)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=((1, 101.0),))
    with pytest.raises(ValueError, match="logit_bias token ids"):
        default_engine.admit([1, 2], SamplingParams(logit_bias=((10**7, 1.0),)))


def test_penalties_through_the_openai_sdk(server, default_engine):
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    text = "List the numbers from one to ten, separated by commas."
    free = default_engine.run(chat_ids(default_engine.tokenizer, text), SamplingParams(max_tokens=24), PLAIN)
    kwargs = dict(model="default", messages=[{"role": "user", "content": text}], max_tokens=24, temperature=0,
                  frequency_penalty=1.0, presence_penalty=0.5, logit_bias={str(free.generated[0]): -100})
    routed = client.chat.completions.create(**kwargs)
    plain = client.chat.completions.create(**kwargs, extra_body={"speculate": False})
    assert routed.choices[0].message.content == plain.choices[0].message.content != free.text
    assert routed.model_extra["knn_ssd"]["draft_tokens"] > 0
