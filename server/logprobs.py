"""OpenAI's ``logprobs`` objects (chat and legacy completions) from the engine's ``TokenLogprob`` lists."""

from __future__ import annotations

import json
import re
from typing import Any

from transformers.convert_slow_tokenizer import bytes_to_unicode

from decoding import TokenLogprob

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback


class LogprobFormatter:
    """Renders token ids as OpenAI does: the token's text and its exact UTF-8 ``bytes``.

    A token can hold part of a multi-byte character: its text then shows U+FFFD, and ``bytes``
    (read from the tokenizer's byte-level alphabet, or a ``<0xNN>`` byte token) still let a
    client rebuild the text exactly.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._byte_of = {ch: b for b, ch in bytes_to_unicode().items()} if _byte_level(tokenizer) else None

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def bytes(self, token_id: int) -> list[int]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if self._byte_of is not None and piece and all(ch in self._byte_of for ch in piece):
            return [self._byte_of[ch] for ch in piece]
        match = _BYTE_TOKEN.fullmatch(piece or "")
        return [int(match[1], 16)] if match else list(self.text(token_id).encode("utf-8"))

    def chat(self, items: list[TokenLogprob]) -> dict[str, Any]:
        """``choices[].logprobs`` of a chat completion (or of one chunk's tokens)."""
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            return {"token": self.text(token_id), "logprob": logprob, "bytes": self.bytes(token_id)}

        return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                            for t in items], "refusal": None}

    def completion(self, items: list[TokenLogprob], text_offset: int) -> dict[str, Any]:
        """``choices[].logprobs`` of a legacy completion; offsets count characters from ``text_offset``.
        An echoed prompt's first token has no log-probability: null in both lists, as OpenAI sends."""
        tokens = [self.text(t.token_id) for t in items]
        offsets = []
        for token in tokens:
            offsets.append(text_offset)
            text_offset += len(token)
        return {"tokens": tokens, "token_logprobs": [t.logprob for t in items],
                "top_logprobs": [None if t.logprob is None else {self.text(i): lp for i, lp in t.top} for t in items],
                "text_offset": offsets}


def _byte_level(tokenizer: Any) -> bool:
    """Whether the tokenizer spells bytes with GPT-2's printable alphabet (its decoder is ByteLevel)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    stack = [decoder]
    while stack:
        node = stack.pop()
        if node.get("type") == "ByteLevel":
            return True
        stack.extend(node.get("decoders") or [])
    return False
