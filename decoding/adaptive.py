"""Load-adaptive speculation: pick each batched step's draft length from costs measured on this machine.

Verification is nearly free only while decoding is memory-bound. As the batch grows, every
drafted token costs real compute in the packed verify, so the best draft length shrinks,
down to none. ``StepCosts`` fits the measured seconds of packed verify and draft forwards;
``SpeculationPlanner`` uses it with each row's observed acceptance to choose the cap that
maximises the whole batch's expected tokens per second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .benchmark import median_ms
from .engine import Sequence
from .policy import DraftPolicy
from .runner import ModelRunner, Segment
from .stats import RequestStats

CAP_CANDIDATES = (0, 1, 2, 3, 4, 6, 8, 12, 16)
# Pseudo-counts before a row has drafted anything: a per-token acceptance of 0.7.
PRIOR_ACCEPTED, PRIOR_REJECTIONS = 2.8, 1.2

@dataclass(frozen=True)
class StepCosts:
    """Seconds of a packed forward: verify ``a + b * rows + c * tokens``; int8 draft ``d + e * rows``."""

    verify: tuple[float, float, float]
    draft: tuple[float, float]
    num_layers: int

    def verify_s(self, rows: int, tokens: int) -> float:
        a, b, c = self.verify
        return max(a + b * rows + c * tokens, 0.0)

    def draft_s(self, policy: DraftPolicy, rows: int) -> float:
        """One draft position for ``rows`` rows of ``policy``: the kept share of its precision's forward."""
        kept = 1.0 - len(policy.skip) / (2 * self.num_layers)
        full = self.verify_s(rows, rows) if policy.precision == "full" else max(self.draft[0] + self.draft[1] * rows,
                                                                                 0.0)
        return kept * full

    def to_dict(self) -> dict[str, list[float]]:
        return {"verify_a_b_c": list(self.verify), "draft_d_e": list(self.draft)}


@torch.inference_mode()
def measure_step_costs(runner: ModelRunner, context: int = 128, rows: tuple[int, ...] = (1, 4, 16),
                       drafts: tuple[int, ...] = (0, 4, 8), repeats: int = 3) -> StepCosts:
    """Time packed verify forwards (rows x draft length) and draft forwards at ``context`` cached tokens."""
    caches = [runner.new_cache(context + max(drafts) + 1) for _ in range(max(rows))]
    samples, targets = [], []
    for b in rows:
        for k in drafts:
            segs = [Segment(torch.randint(10, 1000, (k + 1,), device=runner.device), caches[i], context,
                            all_logits=k > 0) for i in range(b)]
            samples.append([1.0, b, b * (k + 1)])
            targets.append(median_ms(lambda: runner.forward_packed(segs), repeats) / 1000)
    verify = tuple(float(x) for x in np.linalg.lstsq(np.array(samples), np.array(targets), rcond=None)[0])
    policy = DraftPolicy(precision="int8" if runner.draft_lm_head is not None else "full")
    draft_samples, draft_targets = [], []
    for b in rows:
        segs = [Segment(torch.randint(10, 1000, (1,), device=runner.device), caches[i], context) for i in range(b)]
        draft_samples.append([1.0, b])
        draft_targets.append(median_ms(lambda: runner.forward_packed(segs, policy), repeats) / 1000)
    draft = tuple(float(x) for x in np.linalg.lstsq(np.array(draft_samples), np.array(draft_targets),
                                                     rcond=None)[0])
    return StepCosts(verify, draft, runner.num_layers)


class SpeculationPlanner:
    """Chooses the draft-length cap of each batched step (None: every row drafts as its policy says)."""

    def __init__(self, costs: StepCosts) -> None:
        self.costs = costs

    def cap(self, seqs: list[Sequence]) -> int | None:
        """The cap with the highest expected tokens/s for this batch; a lone row decodes as calibrated."""
        speculative = [s for s in seqs if not s.policy.is_plain]
        if len(seqs) <= 1 or not speculative:
            return None
        longest = max(s.policy.max_draft for s in speculative)
        best_cap, best_rate = None, -1.0
        for cap in [c for c in CAP_CANDIDATES if c < longest] + [longest]:
            rate = self.expected_rate(seqs, cap)
            if rate > best_rate * 1.0001:
                best_cap, best_rate = cap, rate
        return None if best_cap == longest else best_cap

    def expected_rate(self, seqs: list[Sequence], cap: int) -> float:
        """Expected tokens per second of one step of ``seqs`` with draft lengths capped at ``cap``."""
        tokens, verify_tokens = 0.0, 0.0
        longest_in_group: dict[DraftPolicy, float] = {}
        rows_in_group: dict[DraftPolicy, int] = {}
        for seq in seqs:
            drafted = 0.0
            if not seq.policy.is_plain:
                s = seq.stats
                usual = s.draft_tokens / s.draft_steps if s.draft_steps else seq.policy.max_draft
                limit = cap if seq.params.draft_length_free else seq.policy.max_draft
                drafted = min(usual, limit, seq.policy.max_draft)
                tokens += expected_accepted(token_acceptance(s), drafted)
                if drafted > 0:
                    longest_in_group[seq.policy] = max(longest_in_group.get(seq.policy, 0.0), drafted)
                    rows_in_group[seq.policy] = rows_in_group.get(seq.policy, 0) + 1
            tokens += 1.0
            verify_tokens += 1.0 + drafted
        seconds = self.costs.verify_s(len(seqs), round(verify_tokens))
        seconds += sum(self.costs.draft_s(p, rows_in_group[p]) * n for p, n in longest_in_group.items())
        return tokens / seconds if seconds > 0 else 0.0


def token_acceptance(stats: RequestStats) -> float:
    """Per-token acceptance of a row's drafts: drafts are accepted one after another until the first
    rejection, so the estimate is accepted / (accepted + rejections), with a prior of 0.7."""
    accepted = stats.accepted_tokens + PRIOR_ACCEPTED
    return accepted / (accepted + stats.draft_rejections + PRIOR_REJECTIONS)


def expected_accepted(alpha: float, drafted: float) -> float:
    """Expected accepted tokens of ``drafted`` drafts accepted in order, each with probability ``alpha``."""
    if drafted <= 0:
        return 0.0
    if alpha >= 1.0:
        return drafted
    return alpha * (1.0 - alpha ** drafted) / (1.0 - alpha)
