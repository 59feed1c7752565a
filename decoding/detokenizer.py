"""Incremental detokenisation that never emits half a UTF-8 character, and stop-string matching."""

from __future__ import annotations

from typing import Any

_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas.

    Decodes a sliding window that starts a few tokens back (prompt tail included) so
    tokenisers that depend on the left context (leading spaces, byte fallback)
    produce the same text as decoding the whole sequence.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix = 0
        self.read = len(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # incomplete character: wait for the next token
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]


class StopMatcher:
    """Accumulates text, finds stop strings and holds back text that may start one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.text = ""
        self.emitted = 0
        self.longest = max((len(s) for s in stops), default=0)

    def add(self, delta: str) -> bool:
        """Append ``delta``; return True (and cut the text) when a stop string appears."""
        search_from = max(0, len(self.text) - self.longest + 1)
        self.text += delta
        hits = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def pop(self, final: bool) -> str:
        """Text that is safe to emit now (everything once ``final``)."""
        end = len(self.text) if final else len(self.text) - self._held_back()
        delta = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta

    def _held_back(self) -> int:
        for n in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
