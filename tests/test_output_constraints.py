"""Constraints beyond JSON (vLLM's ``structured_outputs`` and ``guided_*`` fields): a regex, a choice among
strings, a Lark grammar; matching output, and speculation keeping exactly what plain decoding gives."""

from __future__ import annotations

import re

import httpx
import pytest
from conftest import chat_ids
from openai import OpenAI

from decoding import PLAIN, DraftPolicy, SamplingParams, SkipSet
from decoding.grammar import GrammarError, constraint_grammar

POLICIES = [DraftPolicy(precision="int8", threshold=0.0, max_draft=8),
            DraftPolicy(SkipSet(attention=[3, 9], mlp=[20]), threshold=0.3, max_draft=6, lookup=True)]
DATE = r"\d{4}-\d{2}-\d{2}"
LABELS = ["positive", "negative", "neutral"]
ARITHMETIC = '''start: expr
expr: term ((" + " | " - " | " * ") term)*
term: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,3}/
'''
EXPRESSION = re.compile(r"[0-9() +\-*]+")
CASES = [  # (kind, value, prompt, check of the whole output)
    ("regex", DATE, "When was the Eiffel Tower finished? Answer with a date.", lambda t: re.fullmatch(DATE, t)),
    ("choice", LABELS, "Is this review positive, negative or neutral? 'The soup was cold.'", lambda t: t in LABELS),
    ("grammar", ARITHMETIC, "Write an arithmetic expression that equals 12.", EXPRESSION.fullmatch),
]


@pytest.mark.parametrize("kind, value, prompt, matches", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "seed": 11}], ids=["greedy", "seeded"])
def test_output_matches_and_speculation_keeps_it(default_engine, kind, value, prompt, matches, sampling):
    """Speculation gives plain decoding's tokens, greedy and seeded (each position's own draw)."""
    ids = chat_ids(default_engine.tokenizer, prompt)
    params = SamplingParams(max_tokens=24, grammar=constraint_grammar(kind, value), **sampling)
    plain = default_engine.run(ids, params, PLAIN)
    assert matches(plain.text), plain.text
    for policy in POLICIES:
        spec = default_engine.run(ids, params, policy)
        assert matches(spec.text), spec.text
        assert spec.generated == plain.generated


def test_a_choice_is_exactly_one_of_its_strings_whatever_they_hold(default_engine):
    tok = default_engine.tokenizer
    choices = ['say "hi"', "naïve\\n", "a | b"]
    for choice in choices:
        constraint = default_engine.grammars.constraint(constraint_grammar("choice", choices))
        assert all(constraint.advance(t) for t in tok(choice, add_special_tokens=False).input_ids)
        assert constraint.stopped


@pytest.mark.parametrize("kind, value", [("regex", "(unclosed"), ("grammar", "start: undefined_rule"),
                                         ("grammar", "this is not lark")])
def test_malformed_constraints_do_not_compile(default_engine, kind, value):
    with pytest.raises(GrammarError):
        default_engine.grammars.check(constraint_grammar(kind, value))


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused")


@pytest.mark.parametrize("fields", [{"structured_outputs": {"choice": LABELS}}, {"guided_choice": LABELS}])
def test_chat_streamed_and_not_with_speculation_on_and_off(client, fields):
    messages = [{"role": "user", "content": CASES[1][2]}]
    texts = []
    for speculate in (True, False):
        body = {**fields, "speculate": speculate}
        whole = client.chat.completions.create(model="default", messages=messages, max_tokens=20, temperature=0,
                                               extra_body=body)
        stream = client.chat.completions.create(model="default", messages=messages, max_tokens=20, temperature=0,
                                                stream=True, extra_body=body)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert whole.choices[0].message.content == streamed and whole.choices[0].finish_reason == "stop"
        texts.append(streamed)
    assert texts[0] == texts[1] and texts[0] in LABELS


@pytest.mark.parametrize("fields", [{"structured_outputs": {"regex": DATE}}, {"guided_regex": DATE},
                                    {"structured_outputs": {"grammar": ARITHMETIC}}, {"guided_grammar": ARITHMETIC},
                                    {"guided_json": '{"type": "object"}'},
                                    {"structured_outputs": {"json": {"type": "array", "maxItems": 2}}}])
def test_completions_follow_every_field(client, fields):
    prompt = "Q: When was the Eiffel Tower finished, and how much is 3 + 4?\nA:"
    out = client.completions.create(model="default", prompt=prompt, max_tokens=40, temperature=0, extra_body=fields)
    text = out.choices[0].text
    kind = next(iter(fields.get("structured_outputs", {"x": 0}))) if "structured_outputs" in fields else \
        next(iter(fields)).removeprefix("guided_")
    if kind == "regex":
        assert re.fullmatch(DATE, text)
    elif kind == "grammar":
        assert EXPRESSION.fullmatch(text)
    else:
        assert text.lstrip()[:1] in "{["


@pytest.mark.parametrize("fields, param", [
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"guided_regex": "[z-a]"}, "guided_regex"),
    ({"structured_outputs": {"grammar": "start: nowhere"}}, "structured_outputs.grammar"),
    ({"guided_grammar": "start: ("}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"structured_outputs": {"choice": ["a", ""]}}, "structured_outputs.choice"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs.regex"),
])
def test_malformed_or_conflicting_constraints_are_400s_naming_the_field(server, fields, param):
    for path, body in (("chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("completions", {"prompt": "hi"})):
        r = httpx.post(f"{server.url}/v1/{path}", json={"model": "default", "max_tokens": 4, **body, **fields})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.text
