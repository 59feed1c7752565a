"""The opt-in ``provenance`` field: where every completion token came from, streamed and not."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
from openai import OpenAI

PROMPT = [{"role": "user", "content": "Count from 1 to 30, separated by commas."}]
SOURCES = {"prefill", "draft", "lookup", "verify", "plain"}


def counts_add_up(items: list[dict], knn: dict, completion_tokens: int) -> None:
    """Without EOS or stop strings, every verify step commits its accepted drafts and one token of its own."""
    by_source = Counter(item["source"] for item in items)
    assert set(by_source) <= SOURCES and len(items) == completion_tokens
    assert by_source["draft"] + by_source["lookup"] == knn["accepted_tokens"]
    assert by_source["lookup"] <= knn["lookup_tokens"]
    assert by_source["verify"] + by_source["plain"] == knn["verify_steps"] and by_source["prefill"] == 1
    steps = [item["step"] for item in items]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == knn["verify_steps"]


@pytest.mark.parametrize("speculate", [True, False])
def test_not_streamed(server, speculate):
    body = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "model": "default", "messages": PROMPT, "max_tokens": 60, "temperature": 0, "ignore_eos": True,
        "provenance": True, "logprobs": True, "speculate": speculate}).json()
    choice, knn = body["choices"][0], body["knn_ssd"]
    counts_add_up(choice["provenance"], knn, body["usage"]["completion_tokens"])
    assert [item["logprob"] for item in choice["provenance"]] == [t["logprob"] for t in choice["logprobs"]["content"]]
    assert [item["token"] for item in choice["provenance"]] == [t["token"] for t in choice["logprobs"]["content"]]
    assert (knn["accepted_tokens"] > 0) == speculate


def test_streamed_chunks_carry_their_own_tokens(server):
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    stream = client.chat.completions.create(model="default", messages=PROMPT, max_tokens=60, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"provenance": True, "ignore_eos": True})
    items, text, last = [], "", None
    for chunk in stream:
        last = chunk
        for choice in chunk.choices:
            items += (choice.model_extra or {}).get("provenance", [])
            text += choice.delta.content or ""
    counts_add_up(items, last.model_extra["knn_ssd"], last.usage.completion_tokens)
    assert "".join(item["token"] for item in items) == text and all(i["logprob"] is None for i in items)


def test_completions_and_the_default_is_off(server):
    base = {"model": "default", "prompt": "1, 2, 3, 4,", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    with_field = httpx.post(f"{server.url}/v1/completions", json={**base, "provenance": True}, timeout=120).json()
    counts_add_up(with_field["choices"][0]["provenance"], with_field["knn_ssd"],
                  with_field["usage"]["completion_tokens"])
    plain = httpx.post(f"{server.url}/v1/completions", json=base, timeout=120).json()
    assert "provenance" not in plain["choices"][0]
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=120,
                      json={"model": "default", "messages": PROMPT, "max_tokens": 8, "stream": True}) as r:
        assert "provenance" not in r.read().decode()
