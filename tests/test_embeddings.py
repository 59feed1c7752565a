"""``/v1/embeddings``: the router's prompt embedding in OpenAI's shape, through the openai SDK and raw HTTP."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
from openai import BadRequestError, NotFoundError, OpenAI

from server.embeddings import unit_vector

PARAPHRASES = [  # (a, a paraphrase of a, an unrelated text)
    ("How do I bake a loaf of bread at home?", "What is the way to make homemade bread?",
     "The stock market fell sharply on Tuesday."),
    ("The cat is sleeping on the sofa.", "A cat naps on the couch.",
     "Quantum computers use qubits to perform calculations."),
    ("Write a Python function that reverses a list.", "Implement a python function to reverse a list.",
     "What is the capital city of France?"),
    ("Translate 'good morning' into German.", "How do you say 'good morning' in German?",
     "Explain the causes of the First World War."),
]


def embed(server, payload: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/embeddings", json={"model": "default", **payload}, timeout=120)


def vectors(response: httpx.Response) -> list[np.ndarray]:
    assert response.status_code == 200, response.text
    return [np.array(item["embedding"], dtype=np.float32) for item in response.json()["data"]]


def test_alone_and_in_a_batch_of_eight_are_equal_bit_for_bit(server):
    text = "The cat is sleeping on the sofa."
    others = [f"Sentence {i}: a line about something else entirely, of its own length {'x' * i}." for i in range(7)]
    alone = embed(server, {"input": text})
    batch = embed(server, {"input": [*others[:3], text, *others[3:]]})
    body = batch.json()
    assert [item["index"] for item in body["data"]] == list(range(8))
    assert body["object"] == "list" and body["model"] == "default"
    assert vectors(alone)[0].tobytes() == vectors(batch)[3].tobytes()
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > alone.json()["usage"]["prompt_tokens"]


def test_vectors_are_unit_length_and_token_ids_embed_as_their_text(server, default_model):
    tokenizer = default_model[1]
    text = "Prefill once, route by the mean hidden state."
    ids = tokenizer(text).input_ids
    from_text, from_ids, from_lists = (vectors(embed(server, {"input": x})) for x in (text, ids, [ids, ids]))
    assert from_text[0].shape == (default_model[0].config.hidden_size,)
    assert abs(float(np.linalg.norm(from_text[0])) - 1) < 1e-5
    assert from_text[0].tobytes() == from_ids[0].tobytes() == from_lists[1].tobytes()


def test_the_sdk_decodes_base64_to_the_same_floats(server):
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    texts = ["Compile the kernel once.", "A second, longer input to embed in the same call."]
    floats = vectors(embed(server, {"input": texts, "encoding_format": "float"}))
    sdk = client.embeddings.create(model="default", input=texts)  # the SDK asks for base64 and decodes it
    assert [np.array(d.embedding, dtype=np.float32).tobytes() for d in sdk.data] == [v.tobytes() for v in floats]
    raw = client.embeddings.create(model="default", input=texts, encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in raw.data]
    assert [v.tobytes() for v in decoded] == [v.tobytes() for v in floats]
    assert sdk.usage.prompt_tokens == sdk.usage.total_tokens > 0


@pytest.mark.parametrize("first, paraphrase, unrelated", PARAPHRASES)
def test_paraphrases_are_closer_than_unrelated_texts(server, first, paraphrase, unrelated):
    a, b, c = vectors(embed(server, {"input": [first, paraphrase, unrelated]}))
    assert float(a @ b) > float(a @ c) and float(a @ b) > float(b @ c)


@pytest.mark.parametrize("payload, status, param, code", [
    ({"input": ""}, 400, "input", None),
    ({"input": []}, 400, "input", None),
    ({"input": ["fine", ""]}, 400, "input", None),
    ({"input": [[1, 2], [10 ** 9]]}, 400, "input", None),
    ({"input": "word " * 9000}, 400, "input", "context_length_exceeded"),
    ({"input": "hello", "dimensions": 64}, 400, "dimensions", None),
    ({"input": "hello", "encoding_format": "int8"}, 400, "encoding_format", "literal_error"),
    ({}, 400, "input", "missing"),
    ({"input": "hello", "model": "gpt-4"}, 404, "model", "model_not_found"),
])
def test_bad_input_gets_an_openai_error(server, payload, status, param, code):
    response = embed(server, payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["param"] == param and error["code"] == code


def test_sdk_errors_and_metrics(server):
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(NotFoundError):
        client.embeddings.create(model="nope", input="x")
    with pytest.raises(BadRequestError):
        client.embeddings.create(model="default", input="x", dimensions=3)

    def counters() -> tuple[float, float]:
        text = httpx.get(f"{server.url}/metrics").text
        found = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith(("knn_ssd_embedding_requests_total", "knn_ssd_embedding_tokens_total"))}
        return found["knn_ssd_embedding_requests_total"], found["knn_ssd_embedding_tokens_total"]

    before = counters()
    usage = client.embeddings.create(model="default", input=["one input", "and another one"]).usage
    after = counters()
    assert after[0] - before[0] == 2 and after[1] - before[1] == usage.prompt_tokens


def test_unit_vector_of_zero_stays_zero():
    import torch

    assert not unit_vector(torch.zeros(4)).any()


def test_a_repeated_long_input_reads_its_prefix_from_the_cache(server):
    def hits() -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("knn_ssd_prefix_cache_hit_tokens_total"))

    text = "A long document about caching. " * 40
    first = vectors(embed(server, {"input": text}))
    before = hits()
    second = vectors(embed(server, {"input": text}))
    assert hits() - before >= 128  # whole blocks of the prompt came from the cache
    assert first[0].tobytes() == second[0].tobytes()
