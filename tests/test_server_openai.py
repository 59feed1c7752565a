"""The official openai SDK against a real server: completions, chat, streaming, sync and async."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from conftest import chat_ids
from openai import AsyncOpenAI, OpenAI

from decoding import PLAIN, SamplingParams, native
from knn_router.calibrate import read_domain_file
from server.protocol import APIError, CompletionRequest
from server.routing import PolicyResolver


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused")


@pytest.fixture(scope="module")
def aclient(server):
    """Factory: an async client must live inside the event loop that uses it."""
    return lambda: AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused")


def _plain_text(engine, ids: list[int], max_tokens: int) -> str:
    return engine.run(ids, SamplingParams(max_tokens=max_tokens), PLAIN).text


def test_models_endpoint(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["default"]
    card = client.models.retrieve("default")
    assert card.id == "default" and card.model_extra["max_model_len"] == models.data[0].model_extra["max_model_len"]
    with pytest.raises(openai.NotFoundError) as lost:
        client.models.retrieve("gpt-4o")
    assert lost.value.body["code"] == "model_not_found"


def test_usage_counts_each_prompt_once_whatever_n(client, server):
    """OpenAI (and vLLM) count a prompt once however many choices it gets; completion tokens add up."""
    messages = [{"role": "user", "content": "Name a colour."}]
    counted = httpx.post(f"{server.url}/tokenize", json={"messages": messages}).json()["count"]
    chat = client.chat.completions.create(model="default", messages=messages, max_tokens=3, n=3, seed=1,
                                          logprobs=True)
    assert chat.usage.prompt_tokens == counted
    assert chat.usage.completion_tokens == sum(len(c.logprobs.content) for c in chat.choices)
    prompts = ["Hello", "Bye"]
    lengths = [httpx.post(f"{server.url}/tokenize", json={"prompt": p}).json()["count"] for p in prompts]
    out = client.completions.create(model="default", prompt=prompts, max_tokens=2, n=2, temperature=0)
    assert out.usage.prompt_tokens == sum(lengths)
    assert len(out.choices) == 4 and out.usage.total_tokens == sum(lengths) + out.usage.completion_tokens


def test_responses_carry_their_id_as_x_request_id_and_the_log_names_it(client, server):
    """A client can match a response (streamed or not) with the server's log lines about it."""
    raw = client.chat.completions.with_raw_response.create(
        model="default", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    chat = raw.parse()
    assert raw.headers["x-request-id"] == chat.id
    with client.completions.with_streaming_response.create(model="default", prompt="Once", max_tokens=3,
                                                           n=2, stream=True) as streamed:
        stream_id = streamed.headers["x-request-id"]
        assert {chunk.id for chunk in streamed.parse()} == {stream_id}
    log = server.log_text()
    assert all(f"request {rid}-{i} length:" in log for rid, i in ((chat.id, 0), (stream_id, 0), (stream_id, 1)))


def test_completion_matches_plain_decoding(client, default_engine):
    prompt = "The three primary colours are"
    out = client.completions.create(model="default", prompt=prompt, max_tokens=24, temperature=0)
    ids = default_engine.tokenizer(prompt).input_ids
    assert out.choices[0].text == _plain_text(default_engine, ids, 24)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens <= 24
    ext = out.model_extra["knn_ssd"]
    assert ext["policy"] in ("speculative", "plain") and ext["verify_steps"] >= 1
    assert set(ext) >= {"domain", "similarity", "policy", "skip_attention", "skip_mlp", "draft_precision",
                        "draft_tokens", "accepted_tokens", "verify_steps", "mean_accepted_tokens", "router_ms"}
    assert ext["target"] == "exact"  # the fixture's --target exact


def test_completion_default_max_tokens_echo_and_list_prompt(client):
    out = client.completions.create(model="default", prompt=["Hello", "One, two,"], temperature=0, echo=True,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].text.startswith("Hello") and out.choices[1].text.startswith("One, two,")
    assert out.usage.completion_tokens == 32  # OpenAI's default max_tokens is 16 per choice


def test_chat_matches_plain_decoding(client, default_engine):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": [{"type": "text", "text": "Name a planet with rings."}]}]
    out = client.chat.completions.create(model="default", messages=messages, max_tokens=32, temperature=0)
    ids = default_engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a planet with rings."}],
        add_generation_prompt=True, tokenize=True, return_dict=False)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == _plain_text(default_engine, list(ids), 32)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")


def test_chat_stream_sync(client, default_engine):
    stream = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Count to five."}],
                                            max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"] or finish == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert "knn_ssd" in chunks[-1].model_extra
    ids = chat_ids(default_engine.tokenizer, "Count to five.")
    assert text == _plain_text(default_engine, ids, 20)


def test_completion_stream_async(aclient, default_engine):
    async def run() -> list:
        stream = await aclient().completions.create(model="default", prompt="Once upon a time", max_tokens=20,
                                                  temperature=0, stream=True)
        return [chunk async for chunk in stream]

    chunks = asyncio.run(run())
    text = "".join(c.choices[0].text for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert "knn_ssd" in chunks[-1].model_extra
    assert text == _plain_text(default_engine, default_engine.tokenizer("Once upon a time").input_ids, 20)


def test_chat_async_non_streaming_with_n(aclient):
    async def run():
        return await aclient().chat.completions.create(
            model="default", messages=[{"role": "user", "content": "Give me a random fruit."}], max_tokens=8,
            temperature=1.0, n=3, seed=7)

    out = asyncio.run(run())
    assert [c.index for c in out.choices] == [0, 1, 2]
    again = asyncio.run(run())
    assert [c.message.content for c in out.choices] == [c.message.content for c in again.choices]


def test_speculation_controls(client, default_engine):
    prompt = "Water boils at"
    plain = client.completions.create(model="default", prompt=prompt, max_tokens=16, temperature=0,
                                      extra_body={"speculate": False})
    assert plain.model_extra["knn_ssd"]["policy"] == "plain"
    assert plain.model_extra["knn_ssd"]["draft_tokens"] == 0
    explicit = client.completions.create(model="default", prompt=prompt, max_tokens=16, temperature=0,
                                         extra_body={"skip_layers": {"attention": [3, 9], "mlp": [20]},
                                                     "draft_precision": "int8"})
    ext = explicit.model_extra["knn_ssd"]
    assert (ext["skip_attention"], ext["skip_mlp"], ext["draft_precision"]) == ([3, 9], [20], "int8")
    assert ext["draft_tokens"] > 0
    assert explicit.choices[0].text == plain.choices[0].text
    if native.cpu_kernels() is not None:  # the 4-bit copy lives on the native kernels
        four_bit = client.completions.create(model="default", prompt=prompt, max_tokens=16, temperature=0,
                                             extra_body={"skip_layers": {"attention": [], "mlp": [5]},
                                                         "draft_precision": "int4"})
        assert four_bit.model_extra["knn_ssd"]["draft_precision"] == "int4"
        assert four_bit.choices[0].text == plain.choices[0].text


def test_predicted_output_is_verified_in_big_steps_with_the_same_text(client):
    """OpenAI's ``prediction``: the text the answer will mostly repeat is drafted by lookup and verified,
    so the output stays exactly what decoding without it writes, in fewer full-model steps."""
    messages = [{"role": "user", "content": "Write two sentences about the moon."}]
    plain = client.chat.completions.create(model="default", messages=messages, max_tokens=48, temperature=0,
                                           extra_body={"speculate": False})
    text = plain.choices[0].message.content
    edited = text.replace("moon", "Moon", 1)  # a prediction that is almost right
    for speculate in (True, False):
        out = client.chat.completions.create(model="default", messages=messages, max_tokens=48, temperature=0,
                                             prediction={"type": "content", "content": edited},
                                             extra_body={"speculate": speculate})
        assert out.choices[0].message.content == text
        ext = out.model_extra["knn_ssd"]
        assert ext["lookup"] is speculate and (ext["lookup_tokens"] > 0) is speculate
        details = out.usage.completion_tokens_details  # the edit: one word of the prediction not in the output
        assert 0 < details.accepted_prediction_tokens < out.usage.completion_tokens
        assert 0 < details.rejected_prediction_tokens <= 3
    assert ext["verify_steps"] == out.usage.completion_tokens - 1  # speculate false: a step per token after the 1st
    predicted = client.chat.completions.create(model="default", messages=messages, max_tokens=48, temperature=0,
                                               prediction={"type": "content", "content": text})
    assert predicted.model_extra["knn_ssd"]["verify_steps"] <= predicted.usage.completion_tokens // 4
    assert predicted.usage.completion_tokens_details.accepted_prediction_tokens >= predicted.usage.completion_tokens - 2
    assert plain.usage.completion_tokens_details.accepted_prediction_tokens == 0  # no prediction


def test_tokenize_counts_the_prompt_a_request_decodes_from(client, server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    chat = client.chat.completions.create(model="default", messages=messages, max_tokens=1)
    r = httpx.post(server.url + "/tokenize", json={"model": "default", "messages": messages}).json()
    assert r["count"] == len(r["tokens"]) == chat.usage.prompt_tokens and r["max_model_len"] == 8192
    bare = httpx.post(server.url + "/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert bare["tokens"] == r["tokens"][:bare["count"]] and bare["count"] < r["count"]
    prompt = "The capital of France is"
    completion = client.completions.create(model="default", prompt=prompt, max_tokens=1)
    ids = httpx.post(server.url + "/tokenize", json={"prompt": prompt}).json()["tokens"]
    assert len(ids) == completion.usage.prompt_tokens
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}).json() == {"prompt": prompt}
    for path, body, status, param in [("/tokenize", {"prompt": "a", "messages": messages}, 400, None),
                                      ("/tokenize", {}, 400, None),
                                      ("/tokenize", {"model": "other", "prompt": "a"}, 404, "model"),
                                      ("/detokenize", {"tokens": [-1]}, 400, "tokens")]:
        r = httpx.post(server.url + path, json=body)
        assert r.status_code == status and r.json()["error"]["param"] == param, r.text


def test_a_draft_copy_the_server_lacks_is_a_400():
    resolver = PolicyResolver(None, PLAIN, 30, ("full", "int8"))
    request = CompletionRequest(model="default", prompt="x", skip_layers={"attention": [1]}, draft_precision="int4")
    with pytest.raises(APIError) as err:
        resolver.for_request(request)
    assert err.value.status == 400 and err.value.param == "draft_precision" and "full, int8" in err.value.message


def test_stop_strings(client):
    out = client.completions.create(model="default", prompt="1, 2, 3, 4, 5,", max_tokens=30, temperature=0,
                                    stop=[" 8"])
    assert out.choices[0].finish_reason == "stop"
    assert " 8" not in out.choices[0].text and out.choices[0].text.strip().startswith("6")


def test_eight_concurrent_streams_equal_solo_outputs(aclient, default_engine):
    prompts = [f"Write one sentence about the number {i}." for i in range(8)]

    async def one(text: str) -> str:
        stream = await client.chat.completions.create(model="default", messages=[{"role": "user", "content": text}],
                                                       max_tokens=24, temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def all_at_once() -> list[str]:
        return await asyncio.gather(*(one(p) for p in prompts))

    client = aclient()

    outputs = asyncio.run(all_at_once())
    for text, out in zip(prompts, outputs):
        assert out == _plain_text(default_engine, chat_ids(default_engine.tokenizer, text), 24)


def test_requests_are_routed_by_the_shipped_artifact(client):
    out = client.chat.completions.create(
        model="default", max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": "Translate German to English: Das Wetter ist heute schön."}])
    ext = out.model_extra["knn_ssd"]
    assert ext["domain"] == "translation"
    assert 0 < ext["similarity"] <= 1 and ext["router_ms"] > 0
    forced = client.chat.completions.create(model="default", max_tokens=8, temperature=0,
                                            messages=[{"role": "user", "content": "Hello"}],
                                            extra_body={"domain": "qa"})
    assert forced.model_extra["knn_ssd"]["domain"] == "qa"
    assert forced.model_extra["knn_ssd"]["similarity"] is None


def test_prefix_cache_reuses_the_chat_template_prefix_with_the_same_output(client, server, default_engine):
    reset = httpx.post(f"{server.url}/reset_prefix_cache", timeout=30)
    assert reset.status_code == 200 and reset.json()["enabled"] is True
    answers = []
    for question in ("Name a large desert.", "Name a deep ocean trench."):
        out = client.chat.completions.create(model="default", messages=[{"role": "user", "content": question}],
                                             max_tokens=16, temperature=0)
        ids = chat_ids(default_engine.tokenizer, question)
        assert out.choices[0].message.content == _plain_text(default_engine, ids, 16)
        answers.append(out.usage.prompt_tokens_details.cached_tokens)
    assert answers[0] == 0 and answers[1] >= 16  # the system prompt's block(s), after an empty cache
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    hit = next(line for line in metrics.splitlines() if line.startswith("knn_ssd_prefix_cache_hit_tokens_total"))
    assert float(hit.split()[-1]) >= 16
    held = next(line for line in metrics.splitlines() if line.startswith("knn_ssd_prefix_cache_bytes"))
    assert float(held.split()[-1]) > 0
    cleared = httpx.post(f"{server.url}/reset_prefix_cache", timeout=30).json()
    assert cleared["cleared_blocks"] > 0 and cleared["freed_bytes"] > 0


def test_accepted_prompts_are_logged_for_calibration(client, server, default_engine, tmp_path):
    """``serve --log-prompts`` writes what ``calibrate --traffic`` reads: the token ids the server decoded."""
    text = "Which river flows through Vienna? (prompt log)"
    client.chat.completions.create(model="default", messages=[{"role": "user", "content": text}], max_tokens=2)
    client.completions.create(model="default", prompt=[5, 6, 7], max_tokens=2)
    client.completions.create(model="default", prompt=["Once upon a midnight", "Twice"], max_tokens=2)
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "default", "prompt": "x", "temperature": -1})
    assert r.status_code == 400  # rejected requests are not logged
    rows = [json.loads(line) for line in server.prompt_log.read_text().splitlines()[-4:]]
    assert rows == [{"messages": [{"role": "user", "content": text}]}, {"prompt_ids": [5, 6, 7]},
                    {"prompt": "Once upon a midnight"}, {"prompt": "Twice"}]
    traffic = tmp_path / "traffic.jsonl"
    traffic.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = default_engine.tokenizer
    assert read_domain_file(traffic, tokenizer) == [chat_ids(tokenizer, text), [5, 6, 7],
                                                    tokenizer("Once upon a midnight").input_ids,
                                                    tokenizer("Twice").input_ids]
