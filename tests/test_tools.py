"""Tool calling (``tools``, ``tool_choice``): Hermes ``<tool_call>`` blocks parsed into OpenAI's ``tool_calls``,
forced calls that always follow the function's schema, streamed as a whole, the same with and without
speculation; a template that cannot render tools is a clear 400."""

from __future__ import annotations

import copy
import json

import httpx
import pytest
from live_server import LiveServer
from openai import BadRequestError, OpenAI

from knn_router.calibrate import read_domain_file
from server.cli import main as cli_main
from server.tools import ToolCallStream, forced_call_grammar, parse_tool_calls, template_renders_tools

# ChatML (the default model's prompt format) with the tools rendered as Hermes-style templates do
TOOLS_TEMPLATE = """{%- if tools %}<|im_start|>system
You can call functions. Their signatures:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
To call one, answer with <tool_call>
{"name": <function name>, "arguments": <arguments object>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 30}},
                   "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]
NAMES = ("get_weather", "get_time", "f")


def test_parse_content_and_calls():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
    content, calls = parse_tool_calls(text, NAMES)
    assert content == "Let me check.\n"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                  ("get_time", {"zone": "CET"})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    assert parse_tool_calls("no calls here", NAMES) == ("no calls here", [])
    broken = 'Sure: <tool_call>\n{"name": "get_weather", "arguments": {"city": '  # cut off: stays text
    assert parse_tool_calls(broken, NAMES) == (broken, [])


def test_parse_bare_and_fenced_call_objects():
    """Qwen2.5-Coder-1.5B answers a tool prompt with a fenced call object instead of tags."""
    fenced = '```json\n{\n  "name": "get_weather",\n  "arguments": {"city": "Paris", "unit": "celsius"}\n}\n```'
    content, [call] = parse_tool_calls(fenced, NAMES)
    assert content is None and (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris",
                                                                                           "unit": "celsius"})
    both = '[{"name": "get_time", "arguments": {"zone": "CET"}}, {"name": "get_weather", "arguments": {}}]'
    assert [c.name for c in parse_tool_calls(both, NAMES)[1]] == ["get_time", "get_weather"]
    llama = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'  # Llama 3.1-3.3's JSON tool calls
    assert [(c.name, json.loads(c.arguments)) for c in parse_tool_calls(llama, NAMES)[1]] == [("get_weather",
                                                                                                {"city": "Oslo"})]
    mistral = '[TOOL_CALLS] [{"name": "get_time", "arguments": {"zone": "CET"}}]'  # marker as text (old tokenizers)
    assert parse_tool_calls(mistral, NAMES)[0] is None and parse_tool_calls(mistral, NAMES)[1][0].name == "get_time"
    for text in ('{"name": "unknown_tool", "arguments": {}}', '{"name": "get_time"}', '{"a": 1}', "[1, 2]",
                 '```python\nprint({"name": "get_time", "arguments": {}})\n```'):
        assert parse_tool_calls(text, NAMES) == (text, [])  # not a call of a given function: content


CALL_BODY = '\n{"name": "f", "arguments": {}}\n'


@pytest.mark.parametrize("pieces", [["Hi <tool", "_call>" + CALL_BODY + "</tool_call>"],
                                    ["Hi ", "<", "tool_call>", CALL_BODY, "</tool_call>"],
                                    ["a <b> c <tool_cal", "l and more text"],
                                    ["```js", "on\n", '{"name": "get_time", "arguments": {}}', "\n```"],
                                    ["  {", '"a": 1}'], ["```python\n", "x = 1\n```"],
                                    ["[TOOL_", 'CALLS] [{"name": "f", ', '"arguments": {}}]']])
def test_stream_sends_content_and_the_calls_of_a_whole_parse(pieces):
    stream = ToolCallStream(NAMES)
    sent, deltas = _stream(stream, pieces)
    rest, more, called = stream.finish()
    content, expected = parse_tool_calls("".join(pieces), NAMES)
    assert called == bool(expected)
    assert sent + rest == (content or "") if expected else sent + rest == "".join(pieces)
    assert _accumulate(deltas + more) == [(c.name, c.arguments) for c in expected]


def test_a_call_streams_its_name_then_its_arguments_as_written():
    pieces = ["Checking. <tool", "_call>\n{\"name\": \"get_weather\", ", "\"arguments\": {\"ci", "ty\": \"Oslo\"",
              ", \"unit\":\"celsius\"}", "}\n</tool_call>\n<tool_call>\n{\"arguments\": {}, \"name\": \"f\"}",
              "\n</tool_call>"]
    stream = ToolCallStream(NAMES)
    steps = [stream.feed(p) for p in pieces]
    assert [content for content, _ in steps] == ["Checking. ", "", "", "", "", "", ""]
    assert steps[1][1] == [] and steps[2][1][0]["function"] == {"name": "get_weather", "arguments": '{"ci'}
    assert [d[0]["function"]["arguments"] for _, d in steps[3:5]] == ['ty": "Oslo"', ', "unit":"celsius"}']
    assert steps[5][1] == [] and steps[6][1] == []  # the second block (arguments first) waits for the end
    rest, more, called = stream.finish()
    assert rest == "" and called and [d["index"] for d in more] == [1] and more[0]["function"]["name"] == "f"
    text = "".join(pieces)
    assert _accumulate([d for _, ds in steps for d in ds] + more) == [(c.name, c.arguments)
                                                                     for c in parse_tool_calls(text, NAMES)[1]]
    assert parse_tool_calls(text, NAMES)[1][0].arguments == '{"city": "Oslo", "unit":"celsius"}'  # as written


def _stream(stream: ToolCallStream, pieces: list[str]) -> tuple[str, list[dict]]:
    sent, deltas = "", []
    for piece in pieces:
        content, calls = stream.feed(piece)
        sent, deltas = sent + content, deltas + calls
    return sent, deltas


def _accumulate(deltas: list[dict]) -> list[tuple[str, str]]:
    """What a client builds from tool-call deltas: per index, the name and the concatenated arguments."""
    calls: dict[int, list[str]] = {}
    for delta in deltas:
        function = {"arguments": "", **delta["function"]}
        if delta["index"] not in calls:
            assert delta["id"].startswith("call_") and delta["type"] == "function"
            calls[delta["index"]] = [function["name"], ""]
        calls[delta["index"]][1] += function["arguments"]
    return [tuple(call) for _, call in sorted(calls.items())]


def test_template_detection():
    assert template_renders_tools(TOOLS_TEMPLATE)
    assert not template_renders_tools("{% for message in messages %}{{ message.content }}{% endfor %}")


def test_forced_grammar_accepts_a_call_and_refuses_other_text(default_engine):
    grammar = forced_call_grammar([WEATHER["function"]], parallel=False)
    default_engine.grammars.check(grammar)
    tok = default_engine.tokenizer
    good = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>'
    for text, ok in ((good, True), ('<tool_call>\n{"name": "get_time"', False), ("Sure!", False)):
        constraint = default_engine.grammars.constraint(grammar)
        assert all(constraint.advance(t) for t in tok(text).input_ids) == ok


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("template")
    template = folder / "tools.jinja"
    template.write_text(TOOLS_TEMPLATE)
    with LiveServer("--chat-template", str(template), "--log-prompts", str(folder / "prompts.jsonl")) as live:
        live.template, live.prompt_log = template, folder / "prompts.jsonl"
        yield live


@pytest.fixture(scope="module")
def tools_client(tool_server) -> OpenAI:
    return OpenAI(base_url=f"{tool_server.url}/v1", api_key="unused")


def test_named_tool_choice_gives_a_call_that_follows_the_schema(tools_client, tool_server):
    assert "tool calling: on" in tool_server.log_text()
    out = tools_client.chat.completions.create(
        model="default", messages=ASK, tools=[WEATHER, TIME], max_tokens=80, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius", "fahrenheit")
    plain = tools_client.chat.completions.create(
        model="default", messages=ASK, tools=[WEATHER, TIME], max_tokens=80, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, extra_body={"speculate": False})
    assert plain.choices[0].message.tool_calls[0].function.arguments == call.function.arguments
    assert out.knn_ssd["accepted_tokens"] > 0  # the routed request did speculate


def test_required_tool_choice_streams_the_same_calls(tools_client):
    kwargs = dict(model="default", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=120,
                  temperature=0)
    whole = tools_client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls" and len(whole.message.tool_calls) >= 2  # parallel calls
    assert all(c.function.name in ("get_weather", "get_time") for c in whole.message.tool_calls)
    deltas, finish = [], None
    for chunk in tools_client.chat.completions.create(**kwargs, stream=True):
        if chunk.choices:
            deltas += chunk.choices[0].delta.tool_calls or []
            assert not chunk.choices[0].delta.content
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert len(deltas) > len(whole.message.tool_calls)  # arguments arrive piece by piece
    streamed = _accumulate([d.model_dump(exclude_none=True) for d in deltas])
    assert streamed == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    with tools_client.chat.completions.stream(**kwargs) as events:  # the SDK's own assembly of the deltas
        final = events.get_final_completion().choices[0]
    assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == streamed


def test_auto_without_a_call_is_plain_content(tools_client):
    """``auto``: the model answered in words (this small model does here), so the content passes unchanged."""
    kwargs = dict(model="default", messages=ASK, tools=[WEATHER, TIME], max_tokens=24, temperature=0)
    whole = tools_client.chat.completions.create(**kwargs).choices[0]
    assert whole.message.content and not whole.message.tool_calls and whole.finish_reason in ("stop", "length")
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in
                       tools_client.chat.completions.create(**kwargs, stream=True) if chunk.choices)
    assert streamed == whole.message.content


def test_tool_results_continue_the_conversation(tools_client):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18, "sky": "clear"}'}]
    out = tools_client.chat.completions.create(model="default", messages=messages, tools=[WEATHER], max_tokens=24,
                                               tool_choice="none", temperature=0)
    assert out.choices[0].message.content and not out.choices[0].message.tool_calls
    assert out.usage.prompt_tokens > 80  # the tool definitions, the call and its result are in the prompt


def test_logged_tool_conversations_calibrate_on_the_served_prompt(tools_client, tool_server, default_engine):
    """``--log-prompts`` keeps a conversation's tool calls, results and tools, so ``calibrate --chat-template``
    re-renders exactly the prompt the router embedded."""
    call = {"id": "call_7", "type": "function",
            "function": {"name": "get_time", "arguments": json.dumps({"zone": "Europe/Oslo"})}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_7", "content": '{"time": "12:00"}'}]
    tools_client.chat.completions.create(model="default", messages=messages, tools=[WEATHER, TIME], max_tokens=1,
                                         tool_choice="none")
    served = httpx.post(tool_server.url + "/tokenize", json={"messages": messages, "tools": [WEATHER, TIME]}).json()
    row = json.loads(tool_server.prompt_log.read_text().splitlines()[-1])
    assert [t["function"]["name"] for t in row["tools"]] == ["get_weather", "get_time"]
    assert row["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"zone": "Europe/Oslo"}
    traffic = tool_server.prompt_log.with_name("traffic.jsonl")
    traffic.write_text(json.dumps(row) + "\n")
    tokenizer = copy.copy(default_engine.tokenizer)  # the served template, on a copy the other tests do not see
    tokenizer.chat_template = tool_server.template.read_text()
    assert read_domain_file(traffic, tokenizer) == [served["tokens"]]
    unreadable = traffic.with_name("latin1.jinja")
    unreadable.write_bytes(b"{{ '\xe9t\xe9' }}")
    with pytest.raises(SystemExit, match="cannot read --chat-template"):  # before any model loads
        cli_main(["calibrate", "--traffic", str(traffic), "--out", str(traffic.parent / "art"),
                  "--chat-template", str(unreadable)])


def test_tokenize_counts_the_tool_definitions_too(tools_client, tool_server):
    out = tools_client.chat.completions.create(model="default", messages=ASK, tools=[WEATHER, TIME], max_tokens=1,
                                               tool_choice="none")
    counted = httpx.post(tool_server.url + "/tokenize", json={"messages": ASK, "tools": [WEATHER, TIME]}).json()
    assert counted["count"] == out.usage.prompt_tokens
    assert counted["count"] > httpx.post(tool_server.url + "/tokenize", json={"messages": ASK}).json()["count"]


def test_tool_requests_that_cannot_be_served(tools_client, client):
    with pytest.raises(BadRequestError, match="not in 'tools'") as err:
        tools_client.chat.completions.create(model="default", messages=ASK, tools=[WEATHER],
                                             tool_choice={"type": "function", "function": {"name": "nope"}})
    assert err.value.body["type"] == "invalid_request_error"
    with pytest.raises(BadRequestError, match="needs 'tools'"):
        tools_client.chat.completions.create(model="default", messages=ASK, tool_choice="required")
    bad_schema = {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}
    with pytest.raises(BadRequestError) as err:
        tools_client.chat.completions.create(model="default", messages=ASK, tools=[bad_schema], tool_choice="required")
    assert err.value.body["param"] == "tools"
    with pytest.raises(BadRequestError, match="does not render tools") as err:  # the default model's own template
        client.chat.completions.create(model="default", messages=ASK, tools=[WEATHER])
    assert err.value.body["param"] == "tools"


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused")
