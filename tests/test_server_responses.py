"""OpenAI's Responses API (/v1/responses) through the official openai SDK against a real server."""

from __future__ import annotations

import json

import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_a_response_is_the_equivalent_chat_completion(client):
    """instructions + input generate exactly what the same system + user chat request does."""
    raw = client.responses.with_raw_response.create(model="default", instructions="Answer briefly.",
                                                    input="Name a large planet.", max_output_tokens=12, temperature=0)
    response = raw.parse()
    chat = client.chat.completions.create(model="default", max_tokens=12, temperature=0, messages=[
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a large planet."}])
    assert response.output_text == chat.choices[0].message.content
    assert raw.headers["x-request-id"] == response.id and response.id.startswith("resp_")
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.input_tokens == chat.usage.prompt_tokens and response.usage.output_tokens == 12
    assert response.usage.total_tokens == chat.usage.total_tokens
    assert response.model_extra["knn_ssd"]["policy"] in ("speculative", "plain")
    message = response.output[0]
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"


def test_message_items_and_text_parts_are_a_conversation(client):
    conversation = [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
                    {"role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
                    {"role": "user", "content": "Say it again."}]
    response = client.responses.create(model="default", input=conversation, max_output_tokens=8, temperature=0)
    chat = client.chat.completions.create(model="default", max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Say it again."}])
    assert response.output_text == chat.choices[0].message.content


def test_stream_events_add_up_to_the_response(client):
    events = list(client.responses.create(model="default", input="Count to ten.", max_output_tokens=16,
                                          temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-4].text == events[-1].response.output_text
    plain = client.responses.create(model="default", input="Count to ten.", max_output_tokens=16, temperature=0)
    assert text == plain.output_text


def test_stream_helper_and_structured_output(client):
    with client.responses.stream(model="default", input="Count to ten.", temperature=0,
                                 extra_body={"stop": [","]}) as stream:  # stops early: a completed response
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and "".join(deltas) == final.output_text

    class Planet(BaseModel):
        name: str
        moons: int

    parsed = client.responses.parse(model="default", input="Describe a planet.", text_format=Planet,
                                    max_output_tokens=120, temperature=0).output_parsed
    assert isinstance(parsed, Planet)
    response = client.responses.create(model="default", input="Give JSON.", text={"format": {"type": "json_object"}},
                                       max_output_tokens=120, temperature=0)
    assert response.output_text.lstrip().startswith("{")
    if response.status == "completed":  # the grammar ended the object
        assert isinstance(json.loads(response.output_text), dict)


@pytest.mark.parametrize("fields,param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]}, "input"),
    ({"input": [{"type": "function_call_output", "call_id": "c1", "output": "4"}]}, "input"),
    ({"input": ""}, "input"),
    ({"extra_body": {"response_format": {"type": "json_object"}}}, "response_format"),
], ids=["previous_response_id", "tools", "image", "function_call_output", "empty", "chat response_format"])
def test_what_the_server_cannot_do_is_a_400_naming_it(client, fields, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(**{"model": "default", "input": "Hi", "max_output_tokens": 2, **fields})
    assert refused.value.body["param"] == param and "not" in refused.value.body["message"]


def test_stored_responses_are_a_404_that_says_none_are_stored(client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.retrieve("resp_123")
    assert missing.value.body["code"] == "not_found" and "stores no responses" in missing.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.responses.delete("resp_123")
