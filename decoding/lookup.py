"""Drafts by n-gram lookup: the tokens that followed the latest earlier occurrence of the context's last
few tokens (prompt lookup decoding), in a request's predicted output first (OpenAI's ``prediction``).

Such a draft costs no forward pass; verification decides, so the output is unchanged. It pays where the
output copies its input: summaries and answers quoting a document, edits of given code or text. Where
nothing else drafts (lookup-only policies, the native target's), even a one-token match is worth a short
draft: it is right about half the time, and a 2-3 token verify costs little more than one token.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from difflib import SequenceMatcher

MAX_NGRAM = 4
# Shorter matches were wrong 40-58% of the time (docs/measurements.md): where the model drafts otherwise,
# only matches of 3+ tokens draft; where nothing else drafts, matches down to one token draft at most one
# token more than they match (on the native 1.5B's greedy outputs, 18 Spec-Bench prompts: an expected
# 1.30 -> 1.48x plain at up to 3 tokens, 1.29 -> 1.50x at up to 8; uncapped, 8-token drafts fell to 1.27x).
MIN_NGRAM, LOOKUP_ONLY_MIN_NGRAM = 3, 1


def lookup_min_ngram(drafts_with_model: bool) -> int:
    """The shortest match a lookup drafts from: 3 tokens where the model drafts otherwise, else 1."""
    return MIN_NGRAM if drafts_with_model else LOOKUP_ONLY_MIN_NGRAM


def ngram_lookup(context: Sequence[int], limit: int, reference: Sequence[int] = (),
                 min_ngram: int = MIN_NGRAM, max_ngram: int = MAX_NGRAM) -> list[int]:
    """Up to ``limit`` tokens that followed the longest (``max_ngram`` down to ``min_ngram`` tokens) suffix
    of ``context`` where it last occurred: in ``reference`` if it occurs there, else earlier in ``context``.
    A match shorter than ``MIN_NGRAM`` tokens drafts at most one token more than its length."""
    if limit <= 0:
        return []
    for source in (reference, context):
        words = _words(source)
        for n in range(min(max_ngram, len(context) - 1), min_ngram - 1, -1):
            start = _last_occurrence(words, _words(context[-n:]), len(source) - 1)  # a token must follow
            if start is not None:
                count = limit if n >= MIN_NGRAM else min(limit, n + 1)
                return list(source[start + n:start + n + count])
    return []


def _words(tokens: Sequence[int]) -> bytes:
    """Token ids as fixed-width machine words, for C-speed searches: a Python scan over an 800-token context took
    0.15 ms a row and step, ~5% of an 8-row step of the default model, for drafts the planner mostly trimmed."""
    return array("i", tokens).tobytes()


def _last_occurrence(source: bytes, tail: bytes, end: int) -> int | None:
    """The last token position where ``tail`` occurs in ``source`` within its first ``end`` tokens, or None."""
    word = array("i").itemsize
    stop = max(end, 0) * word
    while (at := source.rfind(tail, 0, stop)) >= 0:
        if at % word == 0:
            return at // word
        stop = at + len(tail) - 1  # a match across word boundaries: look further back
    return None


def prediction_matches(prediction: Sequence[int], output: Sequence[int]) -> int:
    """How many tokens of ``prediction`` appear, in order, in ``output`` (the matching blocks of a diff):
    OpenAI's ``accepted_prediction_tokens``."""
    if not prediction or not output:
        return 0
    blocks = SequenceMatcher(None, list(prediction), list(output), autojunk=False).get_matching_blocks()
    return sum(block.size for block in blocks)
