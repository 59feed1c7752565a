"""Drafts by n-gram lookup: the tokens that followed the latest earlier occurrence of the context's last
few tokens (prompt lookup decoding), in a request's predicted output first (OpenAI's ``prediction``).

Such a draft costs no forward pass; verification decides, so the output is unchanged. It pays where the
output copies its input: summaries and answers quoting a document, edits of given code or text.
"""

from __future__ import annotations

from collections.abc import Sequence
from difflib import SequenceMatcher

MAX_NGRAM, MIN_NGRAM = 4, 3  # shorter matches were wrong about half the time (docs/measurements.md)


def ngram_lookup(context: Sequence[int], limit: int, reference: Sequence[int] = (),
                 max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> list[int]:
    """Up to ``limit`` tokens that followed the longest (``max_ngram`` down to ``min_ngram`` tokens) suffix
    of ``context`` where it last occurred: in ``reference`` if it occurs there, else earlier in ``context``."""
    if limit <= 0:
        return []
    for source in (reference, context):
        for n in range(min(max_ngram, len(context) - 1), min_ngram - 1, -1):
            start = _last_occurrence(source, list(context[-n:]), len(source) - n - 1)  # a token must follow
            if start is not None:
                return list(source[start + n:start + n + limit])
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
