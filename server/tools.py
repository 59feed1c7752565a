"""Tool calling in the Hermes format: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks.

The format of Qwen2.5 (whose chat template renders ``tools`` and asks for these blocks), Hermes 2/3
and the many models tuned like them; an output that is only call objects is read too: Llama 3.1-3.3's
JSON calls (``{"name": ..., "parameters": {...}}``) and Mistral's (``[TOOL_CALLS] [{"name": ...,
"arguments": {...}}]``; the marker is a special token, dropped by decoding, in its v3+ tokenizers).
The chat template puts the tool definitions in the prompt;
``auto`` parses the blocks the model writes; ``required`` or a named function forces them with a
grammar (the call's JSON follows the function's parameter schema), so a forced call always parses.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_JSON_FENCE = "```json"
_MISTRAL_MARKER = "[TOOL_CALLS]"
_FENCE = re.compile(re.escape(_JSON_FENCE) + r"\s*(.*?)\s*```", re.DOTALL)
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)
# a call object's opening up to its arguments object (name first, as Hermes templates show the format)
_HEAD = r'\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"arguments"\s*:\s*(?=\{)'
_BODY_HEAD = re.compile(_HEAD)
_BLOCK_HEAD = re.compile(re.escape(OPEN) + r"\s*" + _HEAD)
_DECODER = json.JSONDecoder()
# the JSON the Hermes format writes (json.dumps' separators), with no room for runaway whitespace
_COMPACT_JSON = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def template_renders_tools(template: str | None) -> bool:
    """Whether a chat template (its Jinja source) renders the ``tools`` it is given."""
    return bool(template) and re.search(r"\btools\b", template) is not None


def call_schema(functions: list[dict[str, Any]]) -> dict[str, Any]:
    """JSON schema of one call ``{"name": ..., "arguments": {...}}`` of any of ``functions`` (OpenAI's
    ``function`` objects: name, description, parameters)."""
    options = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                "properties": {"name": {"const": f["name"]},
                               "arguments": f.get("parameters") or {"type": "object"}}} for f in functions]
    return {"x-guidance": _COMPACT_JSON, **(options[0] if len(options) == 1 else {"anyOf": options})}


def forced_call_grammar(functions: list[dict[str, Any]], parallel: bool) -> str:
    """llguidance grammar of an output that is only tool calls of ``functions`` (one, or one or more)."""
    repeat = ' ("\\n" call)*' if parallel else ""
    return (f'%llguidance {{}}\nstart: call{repeat}\ncall: "{OPEN}\\n" body "\\n{CLOSE}"\n'
            f"body: %json {json.dumps(call_schema(functions))}\n")


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: OpenAI's ``tool_calls`` item (arguments as a JSON string)."""

    id: str
    name: str
    arguments: str

    def to_dict(self, index: int | None = None) -> dict[str, Any]:
        """The response object; with ``index`` the streamed delta form."""
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def parse_tool_calls(text: str, names: Collection[str]) -> tuple[str | None, list[ToolCall]]:
    """Split generated text into its content (the text before the first call, None if empty) and its
    calls. A block whose JSON does not parse as a call leaves the whole text as content, as written
    (vLLM's Hermes parser does the same). Without tags, an output that is nothing but a call object or
    a list of them (``{"name": ..., "arguments": ...}``, bare or in a ```json fence) naming functions of
    ``names`` is read as calls too: Qwen2.5-Coder-1.5B answers a tool prompt that way."""
    start = text.find(OPEN)
    if start < 0:
        calls = _bare_calls(text, names)
        return (None, calls) if calls else (text, [])
    calls = []
    for match in _BLOCK.finditer(text, start):
        call = _block_call(match.group(1))
        if call is None:
            return text, []
        calls.append(call)
    return text[:start] or None, calls


def _block_call(body: str) -> ToolCall | None:
    """The call a ``<tool_call>`` block holds. Where it opens ``{"name": ..., "arguments": {`` (what streaming
    sends piece by piece) its name and arguments are kept as the model wrote them, else re-serialised."""
    call = _call(_json(body))
    head = _BODY_HEAD.match(body)
    if call is None or head is None:
        return call
    return ToolCall(call.id, head.group(1), body[head.end():_value_end(body, head.end())])


def _value_end(text: str, start: int) -> int | None:
    """Where the JSON value starting at ``start`` ends, or None while it is incomplete (or not JSON)."""
    try:
        return _DECODER.raw_decode(text, start)[1]
    except ValueError:
        return None


def _new_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _bare_calls(text: str, names: Collection[str]) -> list[ToolCall]:
    text = text.strip().removeprefix(_MISTRAL_MARKER)
    fenced = _FENCE.fullmatch(text.strip())
    data = _json(fenced.group(1) if fenced else text)
    items = data if isinstance(data, list) else [data]
    calls = [_call(item) for item in items if isinstance(item, dict) and ("arguments" in item or "parameters" in item)]
    return calls if calls and len(calls) == len(items) and all(c and c.name in names for c in calls) else []


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _call(data: Any) -> ToolCall | None:
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(_new_id(), data["name"], arguments)


@dataclass
class _OpenCall:
    """A call whose name has been streamed; its arguments start at ``start`` in the text."""

    index: int
    start: int
    sent: int = 0  # characters of the arguments streamed


class ToolCallStream:
    """Splits a streamed choice into content deltas and tool-call deltas, as OpenAI streams them.

    Text goes out as content until a ``<tool_call>`` tag starts (a tail that could begin one waits for
    the next delta). A block that reads ``{"name": ..., "arguments": {`` then streams as a call: its id
    and name first, then its arguments as the model writes them; anything else (another key order, a
    bare call object or a ```json fence, which cannot be told from text before the end) is held and
    parsed when the choice ends. A block that turns out not to parse once streamed stays a call.
    """

    def __init__(self, names: Collection[str]) -> None:
        self._names = names
        self._text = ""
        self._sent = 0  # characters of ``_text`` sent as content
        self._streamed = 0  # calls whose name went out
        self._open: _OpenCall | None = None
        self._next_block = 0  # where the next ``<tool_call>`` may start

    def feed(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
        """Content and tool-call deltas safe to send now."""
        self._text += delta
        return self._send_upto(self._safe_end()), self._call_deltas()

    def finish(self) -> tuple[str, list[dict[str, Any]], bool]:
        """What is left to send once the choice has ended (content, call deltas) and whether it made calls."""
        deltas = self._call_deltas()
        content, calls = parse_tool_calls(self._text, self._names)
        if not calls:
            if self._streamed:  # a streamed block did not parse in the end: the calls stand as sent
                return "", deltas, True
            return self._send_upto(len(self._text)), [], False
        for index, call in enumerate(calls[self._streamed:], self._streamed):
            deltas.append(call.to_dict(index))  # calls streaming could not read, whole
        return (content or "")[self._sent:], deltas, True

    def _call_deltas(self) -> list[dict[str, Any]]:
        deltas = []
        while True:
            if self._open is None:
                head = _BLOCK_HEAD.search(self._text, self._next_block)
                if head is None or self._text.find(OPEN, self._next_block) != head.start():
                    break  # no block yet, or one that streaming cannot read: it waits for the end
                self._open = _OpenCall(self._streamed, head.end())
                self._streamed += 1
                deltas.append({"index": self._open.index, "id": _new_id(), "type": "function",
                               "function": {"name": head.group(1), "arguments": ""}})
            call = self._open
            end = _value_end(self._text, call.start)
            upto = len(self._text) if end is None else end  # an incomplete value: all of it is arguments
            piece = self._text[call.start + call.sent:upto]
            call.sent += len(piece)
            if piece:
                deltas.append({"index": call.index, "function": {"arguments": piece}})
            if end is None:
                break
            self._open, self._next_block = None, end
        return _merged(deltas)

    def _safe_end(self) -> int:
        head = self._text.lstrip()
        if not head or head[0] in "{[" or _JSON_FENCE.startswith(head[:len(_JSON_FENCE)]):  # [ holds [TOOL_CALLS]
            return self._sent  # a bare call may be coming: hold it all
        tag = self._text.find(OPEN)
        if tag >= 0:
            return tag
        n = len(self._text)
        return n - next((k for k in range(min(len(OPEN) - 1, n), 0, -1) if OPEN.startswith(self._text[-k:])), 0)

    def _send_upto(self, end: int) -> str:
        text, self._sent = self._text[self._sent:end], max(self._sent, end)
        return text


def _merged(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One delta per call index (a call's opening and its first arguments in one item)."""
    out: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        if delta["index"] in out:
            out[delta["index"]]["function"]["arguments"] += delta["function"]["arguments"]
        else:
            out[delta["index"]] = {**delta, "function": dict(delta["function"])}
    return list(out.values())
