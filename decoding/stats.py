"""Per-request decoding statistics."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class TokenSource:
    """Where a committed token came from: ``prefill`` (the first token, from the prompt's last logits),
    ``draft`` / ``lookup`` (a model / n-gram lookup draft the full model accepted), ``verify`` (the
    correction or bonus token of a verify step that checked drafts) or ``plain`` (a step without drafts);
    ``step`` is the verify step (1, 2, ...; 0 for the prefill)."""

    source: str
    step: int


@dataclass
class RequestStats:
    """Counters of one request. A plain decoding step counts as a verify step with no drafts."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not prefilled)
    completion_tokens: int = 0
    verify_steps: int = 0
    draft_tokens: int = 0
    lookup_tokens: int = 0  # drafted by n-gram lookup (no forward pass), included in draft_tokens
    accepted_tokens: int = 0
    accepted_prediction_tokens: int = 0  # tokens of the request's predicted output that the output contains
    rejected_prediction_tokens: int = 0  # the rest of the predicted output
    draft_steps: int = 0  # verify steps that checked at least one drafted token
    draft_rejections: int = 0  # verify steps in which the full model rejected a drafted token
    step_tokens: int = 0  # tokens produced by verify steps, before stop/max_tokens truncation
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    finish_reason: str | None = None

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted tokens the full model accepted."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_tokens(self) -> float:
        """Tokens committed per verify forward (accepted drafts + the target's own token)."""
        return self.step_tokens / self.verify_steps if self.verify_steps else 0.0

    @property
    def decode_s(self) -> float:
        return self.draft_s + self.verify_s

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(acceptance_rate=self.acceptance_rate, mean_accepted_tokens=self.mean_accepted_tokens,
                    decode_s=self.decode_s)
        return data
