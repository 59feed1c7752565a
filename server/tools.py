"""Tool calling in the Hermes format: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks.

The format of Qwen2.5 (whose chat template renders ``tools`` and asks for these blocks), Hermes 2/3
and the many models tuned like them. The chat template puts the tool definitions in the prompt;
``auto`` parses the blocks the model writes; ``required`` or a named function forces them with a
grammar (the call's JSON follows the function's parameter schema), so a forced call always parses.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)
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


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """Split generated text into its content (the text before the first call, None if empty) and its
    calls. A block whose JSON does not parse as a call leaves the whole text as content, as written
    (vLLM's Hermes parser does the same)."""
    start = text.find(OPEN)
    if start < 0:
        return text, []
    calls = []
    for match in _BLOCK.finditer(text, start):
        call = _call(match.group(1))
        if call is None:
            return text, []
        calls.append(call)
    return text[:start] or None, calls


def _call(body: str) -> ToolCall | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", data["name"], arguments)


class ToolCallStream:
    """Splits a streamed choice into content deltas and, at its end, its tool calls.

    Text goes out as content until a ``<tool_call>`` tag starts; a tail that could be the start of one
    waits for the next delta. From the tag on, text is held and parsed when the choice finishes.
    """

    def __init__(self) -> None:
        self._pending = ""  # not yet sent: a possible tag start, or everything from a tag on
        self._held = ""  # everything from the first tag on
        self._sent_content = ""

    def feed(self, delta: str) -> str:
        """Content safe to send now."""
        if self._held:
            self._held += delta
            return ""
        text = self._pending + delta
        tag = text.find(OPEN)
        if tag >= 0:
            self._held, self._pending = text[tag:], ""
            return self._send(text[:tag])
        keep = next((n for n in range(min(len(OPEN) - 1, len(text)), 0, -1) if OPEN.startswith(text[-n:])), 0)
        self._pending = text[len(text) - keep:]
        return self._send(text[:len(text) - keep])

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The content still to send and the calls, once the choice has ended."""
        if not self._held:
            rest, self._pending = self._pending, ""
            return self._send(rest), []
        content, calls = parse_tool_calls(self._sent_content + self._held)
        if not calls:  # not a call after all: it goes out as text
            held, self._held = self._held, ""
            return self._send(held), []
        return "", calls

    def _send(self, text: str) -> str:
        self._sent_content += text
        return text
