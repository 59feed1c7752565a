"""Structured output (``response_format``): JSON that follows the schema, exactly what plain decoding
gives under speculation, through the openai SDK's own parsing."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import chat_ids
from openai import OpenAI
from pydantic import BaseModel

from decoding import PLAIN, DraftPolicy, SamplingParams, SkipSet
from decoding.grammar import GrammarError, json_schema_grammar

POLICIES = [DraftPolicy(precision="int8", threshold=0.0, max_draft=8),
            DraftPolicy(SkipSet(attention=[3, 9], mlp=[20]), threshold=0.3, max_draft=6)]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 30}, "age": {"type": "integer"},
    "languages": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3}},
    "required": ["name", "age", "languages"], "additionalProperties": False}


class Person(BaseModel):
    name: str
    age: int
    languages: list[str]


@pytest.mark.parametrize("text", ["Describe Ana, a translator from Lisbon, as JSON.",
                                  "Give me a JSON record for a retired pilot."])
def test_schema_output_is_valid_and_speculation_keeps_it(default_engine, text):
    ids = chat_ids(default_engine.tokenizer, text)
    params = SamplingParams(max_tokens=120, grammar=json_schema_grammar(PERSON))
    plain = default_engine.run(ids, params, PLAIN)
    record = json.loads(plain.text)
    assert plain.finish_reason == "stop" and set(record) == {"name", "age", "languages"}
    assert isinstance(record["age"], int) and all(isinstance(x, str) for x in record["languages"])
    for policy in POLICIES:
        spec = default_engine.run(ids, params, policy)
        assert spec.generated == plain.generated and spec.stats.accepted_tokens > 0


def test_any_json_object(default_engine):
    ids = chat_ids(default_engine.tokenizer, "List three colours.")
    seq = default_engine.run(ids, SamplingParams(max_tokens=60, grammar=json_schema_grammar({"type": "object"})),
                             POLICIES[0])
    assert seq.finish_reason == "stop" and isinstance(json.loads(seq.text), dict)


def test_a_refused_token_leaves_the_grammar_usable(default_engine):
    """A token the grammar refuses (a lookup draft can be one) is not consumed and breaks nothing after."""
    tok = default_engine.tokenizer
    constraint = default_engine.grammars.constraint(json_schema_grammar({"type": "object"}))
    assert constraint.advance(tok("{").input_ids[0])
    assert not constraint.advance(tok(" x").input_ids[0])
    assert all(constraint.advance(t) for t in tok('"a": 1}').input_ids) and constraint.stopped


def test_a_broken_schema_is_refused(default_engine):
    with pytest.raises(GrammarError, match="nonsense"):
        default_engine.grammars.check(json_schema_grammar({"type": "nonsense"}))


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused")


def test_the_sdk_parses_a_schema_response(client):
    """``chat.completions.parse`` sends the pydantic model as a strict json_schema and validates the reply."""
    messages = [{"role": "user", "content": "Invent a person who speaks two languages, as JSON."}]
    routed = client.chat.completions.parse(model="default", messages=messages, response_format=Person,
                                           max_tokens=80, temperature=0)
    person = routed.choices[0].message.parsed
    assert isinstance(person, Person) and routed.choices[0].finish_reason == "stop"
    assert routed.model_extra["knn_ssd"]["draft_tokens"] > 0
    plain = client.chat.completions.parse(model="default", messages=messages, response_format=Person,
                                          max_tokens=80, temperature=0, extra_body={"speculate": False})
    assert plain.choices[0].message.parsed == person


def test_json_object_mode_and_streaming(client):
    kwargs = dict(model="default", messages=[{"role": "user", "content": "Give the capital of France as a JSON "
                                                                   "object with the keys city and country."}],
                  response_format={"type": "json_object"}, max_tokens=200, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(**kwargs, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == whole.choices[0].message.content and whole.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("response_format,message", [
    ({"type": "json_schema"}, "needs a 'json_schema' object"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, "nonsense"),
    ({"type": "xml"}, "'json_schema' (at response_format.type)"),
])
def test_bad_response_formats_are_400s(server, response_format, message):
    r = httpx.post(f"{server.url}/v1/chat/completions", json={
        "model": "default", "messages": [{"role": "user", "content": "hi"}], "response_format": response_format})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_completions_take_a_response_format_too(client):
    out = client.completions.create(model="default", prompt="A person as JSON:", max_tokens=120, temperature=0,
                                    extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                        "name": "person", "schema": PERSON}}})
    assert out.choices[0].finish_reason == "stop"
    assert set(json.loads(out.choices[0].text)) == {"name", "age", "languages"}
