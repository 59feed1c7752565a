"""Drafts by n-gram lookup: the tokens that followed the latest earlier occurrence of the context's last
few tokens (prompt lookup decoding), in a request's predicted output first (OpenAI's ``prediction``).

Such a draft costs no forward pass; verification decides, so the output is unchanged. It pays where the
output copies its input: summaries and answers quoting a document, edits of given code or text. Where
nothing else drafts (lookup-only policies, the native target's), even a one-token match is worth a short
draft: it is right about half the time, and a 2-3 token verify costs little more than one token.
"""

from __future__ import annotations

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
        for n in range(min(max_ngram, len(context) - 1), min_ngram - 1, -1):
            start = _last_occurrence(source, list(context[-n:]), len(source) - n - 1)  # a token must follow
            if start is not None:
                count = limit if n >= MIN_NGRAM else min(limit, n + 1)
                return list(source[start + n:start + n + count])
    return []


def _last_occurrence(source: Sequence[int], tail: list[int], last_start: int) -> int | None:
    """The last start position ``<= last_start`` of ``tail`` in ``source``, or None."""
    first = tail[0]
    for start in range(last_start, -1, -1):
        if source[start] == first and list(source[start:start + len(tail)]) == tail:
            return start
    return None


def prediction_matches(prediction: Sequence[int], output: Sequence[int]) -> int:
    """How many tokens of ``prediction`` appear, in order, in ``output`` (the matching blocks of a diff):
    OpenAI's ``accepted_prediction_tokens``."""
    if not prediction or not output:
        return 0
    blocks = SequenceMatcher(None, list(prediction), list(output), autojunk=False).get_matching_blocks()
    return sum(block.size for block in blocks)
