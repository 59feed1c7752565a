"""Malformed requests get OpenAI-shaped errors with the right status, and the server stays up."""

from __future__ import annotations

import httpx
import pytest

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]

CASES = [
    ("invalid JSON", COMP, b'{"model": "default", "prompt": ', 400),
    ("body is a list", COMP, [1, 2, 3], 400),
    ("prompt wrong type", COMP, {"model": "default", "prompt": 5}, 400),
    ("max_tokens wrong type", COMP, {"model": "default", "prompt": "a", "max_tokens": "ten"}, 400),
    ("missing prompt", COMP, {"model": "default"}, 400),
    ("empty prompt", COMP, {"model": "default", "prompt": ""}, 400),
    ("empty messages", CHAT, {"model": "default", "messages": []}, 400),
    ("unknown role", CHAT, {"model": "default", "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("n = 0", CHAT, {"model": "default", "messages": MSG, "n": 0}, 400),
    ("max_tokens = -1", COMP, {"model": "default", "prompt": "a", "max_tokens": -1}, 400),
    ("max_tokens far over the context", COMP, {"model": "default", "prompt": "a", "max_tokens": 10**7}, 400),
    ("temperature = -1", CHAT, {"model": "default", "messages": MSG, "temperature": -1}, 400),
    ("top_p = 2", CHAT, {"model": "default", "messages": MSG, "top_p": 2}, 400),
    ("prompt over the context", COMP, {"model": "default", "prompt": "word " * 9000, "max_tokens": 1}, 400),
    ("100 stop strings", COMP, {"model": "default", "prompt": "a", "stop": [f"s{i}" for i in range(100)]}, 400),
    ("unknown model", CHAT, {"model": "gpt-4o", "messages": MSG}, 404),
    ("logprobs = 21", COMP, {"model": "default", "prompt": "a", "logprobs": 21}, 400),
    ("top_logprobs without logprobs", CHAT, {"model": "default", "messages": MSG, "top_logprobs": 2}, 400),
    ("presence_penalty = 3", CHAT, {"model": "default", "messages": MSG, "presence_penalty": 3}, 400),
    ("logit_bias key not a token id", CHAT, {"model": "default", "messages": MSG, "logit_bias": {"abc": 1}}, 400),
    ("logit_bias token out of vocab", CHAT, {"model": "default", "messages": MSG, "logit_bias": {"999999": 1}}, 400),
    ("logit_bias value 200", COMP, {"model": "default", "prompt": "a", "logit_bias": {"5": 200}}, 400),
    ("skip index out of range", COMP, {"model": "default", "prompt": "a", "skip_layers": {"attention": [30]}}, 400),
    ("unknown domain", COMP, {"model": "default", "prompt": "a", "domain": "astrology"}, 400),
    ("token id out of vocab", COMP, {"model": "default", "prompt": [1, 999999]}, 400),
    ("image content part", CHAT, {"model": "default", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400),
    ("seed over 64 bits", COMP, {"model": "default", "prompt": "a", "seed": 2**70}, 400),
    ("deprecated functions", CHAT, {"model": "default", "messages": MSG, "functions": [{"name": "f"}]}, 400),
    ("deprecated function_call", CHAT, {"model": "default", "messages": MSG, "function_call": "auto"}, 400),
    ("audio output", CHAT, {"model": "default", "messages": MSG, "modalities": ["text", "audio"]}, 400),
    ("web search", CHAT, {"model": "default", "messages": MSG, "web_search_options": {}}, 400),
    ("unknown endpoint", "/v1/images/generations", {"model": "default", "prompt": "a"}, 404),
]


@pytest.mark.parametrize("name,path,body,status", CASES, ids=[c[0] for c in CASES])
def test_malformed_request(server, name, path, body, status):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = httpx.post(server.url + path, timeout=60, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_seeds_at_the_64_bit_limits_sample(server):
    """The largest and smallest 64-bit seeds work, also where a later choice's seed (seed + index) passes them."""
    for seed in (2**63 - 1, -2**63):
        r = httpx.post(server.url + COMP, json={"model": "default", "prompt": "a", "max_tokens": 2, "n": 2,
                                                 "seed": seed}, timeout=60)
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 2


def test_null_fields_mean_omitted(server):
    """Clients that send every optional field, unset ones as null, get the defaults (OpenAI's behaviour)."""
    nulls = {"n": None, "temperature": None, "top_p": None, "stop": None, "seed": None, "stream": None,
             "stream_options": None, "presence_penalty": None, "logit_bias": None, "response_format": None}
    r = httpx.post(server.url + CHAT, json={"model": "default", "messages": MSG, "max_tokens": 2, "logprobs": None,
                                            "tools": None, "tool_choice": None, **nulls}, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1


def test_unknown_fields_are_ignored_and_logged(server):
    r = httpx.post(server.url + COMP, json={"model": "default", "prompt": "a", "max_tokens": 2,
                                             "frobnicate": True, "temperature": 0}, timeout=60)
    assert r.status_code == 200
    r = httpx.post(server.url + CHAT, json={"model": "default", "messages": MSG, "max_tokens": 2, "store": False,
                                            "metadata": {"team": "a"}, "modalities": ["text"]}, timeout=60)
    assert r.status_code == 200, r.text
    log = server.log_text()
    assert "present in the request but ignored: frobnicate" in log
    assert "present in the request but ignored: metadata, store" in log


def test_refused_openai_fields_name_the_alternative(server):
    r = httpx.post(server.url + CHAT, json={"model": "default", "messages": MSG,
                                            "functions": [{"name": "f", "parameters": {"type": "object"}}]})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "functions" and "'tools'" in error["message"]


def test_error_messages_name_the_problem(server):
    r = httpx.post(server.url + CHAT, json={"model": "default", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {}}]}]})
    assert r.status_code == 400 and "not image_url" in r.json()["error"]["message"]
    r = httpx.post(server.url + COMP, content=b'{"model": ', headers={"content-type": "application/json"})
    assert r.json()["error"]["param"] is None and "parse the JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + CHAT, json={"model": "default", "messages": MSG, "top_logprobs": 2})
    assert r.json()["error"]["message"].startswith("'logprobs' must be set to true")
    body = b'{"model": "default", "prompt": "a"}'
    for content_type, says in (("text/plain", "(this one's is text/plain)"), (None, "(this one's is missing)")):
        r = httpx.post(server.url + COMP, content=body, headers={"content-type": content_type} if content_type else {})
        assert r.status_code == 400 and r.json()["error"]["message"].endswith(says), r.text
        assert "'Content-Type: application/json'" in r.json()["error"]["message"]
    r = httpx.post(server.url + COMP, json=[1, 2])
    assert r.json()["error"]["message"] == "The request body must be a JSON object"
    r = httpx.get(server.url + CHAT)
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    assert r.json()["error"]["code"] == "method_not_allowed"


def test_unwritable_prompt_log_fails_fast_with_a_message(tmp_path):
    from server.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="--log-prompts .*cannot write there"):
        main(["serve", "--log-prompts", str(blocker / "prompts.jsonl")])


@pytest.mark.parametrize("argv,message", [
    (["serve", "--port", "80000"], "not a port"),
    (["bench-serve", "--clients", "1", "--port", "-1"], "not a port"),
    (["bench", "--quick", "--data", "/no/such/question.jsonl"], "no such file"),
    (["route-eval", "--data", "/no/such/question.jsonl"], "no such file"),
    (["calibrate", "--traffic", "/no/such/traffic.jsonl", "--out", "x"], "no such file"),
    (["serve", "--max-batch-size", "0"], "below the least allowed value, 1"),
    (["serve", "--prefix-cache-mb", "-5"], "below the least allowed value, 0"),
    (["bench-serve", "--clients", "1,eight"], "'eight' is not an integer"),
    (["bench-decode", "--prompts", "0"], "below the least allowed value, 1"),
])
def test_bad_cli_arguments_fail_before_loading_with_a_message(argv, message, capsys):
    from server.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_calibrate_names_a_missing_or_malformed_prompt_file(tmp_path):
    from server.cli import main

    with pytest.raises(SystemExit, match="--domain qa=.*: no such file"):
        main(["calibrate", "--domain", f"qa={tmp_path / 'missing.jsonl'}", "--out", str(tmp_path / "art")])
    broken = tmp_path / "qa.jsonl"
    broken.write_text('{"prompt": "What is 2 + 2?"}\n{"prompt": \n')
    with pytest.raises(SystemExit, match=r"qa.jsonl:2: not valid JSON"):
        main(["calibrate", "--domain", f"qa={broken}", "--out", str(tmp_path / "art")])


def test_bench_names_an_index_that_is_not_an_artifact(tmp_path):
    from server.cli import main

    with pytest.raises(SystemExit, match="--index .*router.json: file missing"):
        main(["bench", "--quick", "--index", str(tmp_path), "--out", str(tmp_path / "out")])
