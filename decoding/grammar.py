"""Structured output (JSON schemas and other grammars) with llguidance, kept exact under speculation.

llguidance compiles a grammar against the tokenizer and, for any prefix, gives the set of tokens that
can come next (a bitmask over the vocabulary) in tens of microseconds; it can also roll tokens back.
A constrained row masks its draft logits with the state after the committed tokens and the drafts
so far, and every verify row with the state after the committed tokens and the drafts before it, so
drafts and verification see the same constrained distribution and speculation stays exact for it.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance
import llguidance.hf
import torch

_BITS = torch.arange(32, dtype=torch.int32)  # bit positions of a bitmask word


class GrammarError(ValueError):
    """A grammar or JSON schema llguidance cannot compile for this tokenizer."""


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """The llguidance grammar of a JSON schema (``{"type": "object"}``: any JSON object)."""
    return llguidance.LLMatcher.grammar_from_json_schema(schema)


def constraint_grammar(kind: str, value: Any) -> str:
    """The llguidance grammar of an output constraint: ``json`` (a schema), ``regex`` (the whole output
    matches it), ``choice`` (the output is exactly one of the strings) or ``grammar`` (Lark, llguidance's
    dialect); ``GrammarError`` for a schema it cannot read (patterns and grammars are checked by
    ``GrammarCompiler.check``)."""
    try:
        if kind == "json":
            return json_schema_grammar(value)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(value)
        if kind == "choice":
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
        if kind == "grammar":
            return llguidance.LLMatcher.grammar_from_lark(value)
    except (ValueError, TypeError) as exc:
        raise GrammarError(f"invalid {kind}: {exc}") from exc
    raise ValueError(f"unknown constraint kind {kind!r}")


class GrammarCompiler:
    """Compiles grammars for one model's tokenizer (its llguidance form is built on first use)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: set[int]) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos_ids = sorted(eos_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size,
                                                           eos_token=self._eos_ids or None)
        return self._tokenizer

    def prepare(self) -> None:
        """Build llguidance's tokenizer now (0.4 s for a 49k vocabulary here) instead of on first use."""
        _ = self.tokenizer

    def check(self, grammar: str) -> None:
        """Raise ``GrammarError`` with llguidance's message if ``grammar`` does not compile."""
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise GrammarError(f"invalid grammar: {error}")

    def constraint(self, grammar: str) -> GrammarConstraint:
        """A fresh matcher of ``grammar`` for one sequence."""
        matcher = llguidance.LLMatcher(self.tokenizer, grammar)
        if matcher.is_error():
            raise GrammarError(f"invalid grammar: {matcher.get_error()}")
        return GrammarConstraint(matcher, self.vocab_size)


class GrammarConstraint:
    """One sequence's grammar state: masks logits rows and advances with committed tokens."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size

    @property
    def stopped(self) -> bool:
        """Whether the grammar is complete and nothing may follow (the sequence ends here)."""
        return self.matcher.is_stopped()

    def mask(self, logits: torch.Tensor, appended: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
        """``logits`` with tokens the grammar forbids at -inf; row ``i`` follows the committed tokens and
        ``appended[:i]`` (consumed to compute the masks, then rolled back). A row the grammar leaves no
        token for (it follows a token that ended or broke the grammar, so it is never used) stays as is."""
        rows, words = logits.shape[0], (self.vocab_size + 31) // 32
        bitmask = torch.zeros(rows, words, dtype=torch.int32)
        consumed = 0
        for i in range(rows):
            bitmask[i] = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)[:words]
            if i + 1 < rows:
                if self.matcher.is_stopped() or not self.advance(appended[i]):
                    break
                consumed += 1
        if consumed:
            self.matcher.rollback(consumed)
        allowed = ((bitmask[:, :, None] >> _BITS) & 1).bool().reshape(rows, -1)[:, :logits.shape[-1]]
        allowed[consumed + 1:] = True  # rows after a token the grammar refused or ended on: never used
        allowed[~allowed.any(dim=-1)] = True
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    def advance(self, token: int) -> bool:
        """Consume a token; False (and nothing consumed) if the grammar does not allow it here. Checked
        first: llguidance's matcher stays in an error state after consuming a token it refuses (an n-gram
        lookup draft can be one)."""
        return self.matcher.validate_tokens([token]) == 1 and bool(self.matcher.consume_token(token))

    def retract(self, count: int) -> None:
        """Undo the last ``count`` tokens (drafts consumed while drafting)."""
        if count:
            self.matcher.rollback(count)
