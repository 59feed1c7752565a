"""Load-adaptive speculation: pick each batched step's draft length from costs measured on this machine.

Verification is nearly free only while decoding is memory-bound. As the batch grows, every
drafted token costs real compute in the packed verify, so the best draft length shrinks,
down to none. ``StepCosts`` fits the measured seconds of packed verify and draft forwards
(flat, then steeper: ``HingeCost``);
``SpeculationPlanner`` uses it with each row's observed acceptance to choose the cap that
maximises the whole batch's expected tokens per second before drafting, and, once the drafts
are known (an n-gram lookup drafts without a forward pass, so only a row's draft says how
long it is), how many of each row's drafted tokens the packed verify checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .engine import Sequence
from .policy import DraftPolicy
from .runner import ModelRunner, Segment
from .stats import RequestStats
from .timing import median_ms, wait_for

CAP_CANDIDATES = (0, 1, 2, 3, 4, 6, 8, 12, 16)
# Pseudo-counts before a row has drafted anything: a per-token acceptance of 0.7.
PRIOR_ACCEPTED, PRIOR_REJECTIONS = 2.8, 1.2

@dataclass(frozen=True)
class HingeCost:
    """Seconds ``a + b * rows + c * x + d * max(x - knee, 0)``: nearly flat while a forward is bound by
    memory (weights read once, whatever the tokens), steeper from ``knee`` tokens on, where it is bound
    by compute. A straight line through both regimes overestimates small batches and underestimates
    large ones, which made the planner draft where drafting lost (measured on the 1.5B model)."""

    a: float
    b: float = 0.0
    c: float = 0.0
    d: float = 0.0
    knee: float = 0.0

    def __call__(self, rows: int, x: float) -> float:
        return max(self.a + self.b * rows + self.c * x + self.d * max(x - self.knee, 0.0), 0.0)

    @classmethod
    def fit(cls, rows: list[int], xs: list[float], seconds: list[float], per_row: bool = True) -> HingeCost:
        """Least squares of the relative error (a 1-token step matters as much as a 100-token one) at
        every knee among the measured ``xs`` (and none); the best fit wins."""
        rows_col = np.array(rows, dtype=float) if per_row else np.zeros(len(rows))
        x = np.array(xs, dtype=float)
        y = np.array(seconds, dtype=float)
        weight = 1.0 / np.maximum(y, 1e-9)
        fits = []
        for knee in [None, *sorted(set(xs))[1:-1]]:
            hinge = np.zeros_like(x) if knee is None else np.maximum(x - knee, 0.0)
            design = np.stack([np.ones_like(x), rows_col, x, hinge], axis=1)
            coef = np.linalg.lstsq(design * weight[:, None], y * weight, rcond=None)[0]
            error = float(np.sum(((design @ coef - y) * weight) ** 2))
            fits.append((error, cls(*(float(v) for v in coef), knee=float(knee or 0.0))))
        return min(fits, key=lambda fit: fit[0])[1]

    def describe(self, x: str) -> str:
        return f"{self.a:.4f} + {self.b:.4f}*rows + {self.c:.4f}*{x} + {self.d:.4f}*max({x} - {self.knee:g}, 0)"


@dataclass(frozen=True)
class StepCosts:
    """Seconds of a packed verify forward (``rows``, total ``tokens``) and of one draft position (``rows``) per
    quantised draft precision (a full-precision draft costs what a one-token verify of its rows does)."""

    verify: HingeCost
    drafts: dict[str, HingeCost]
    num_layers: int

    def verify_s(self, rows: int, tokens: int) -> float:
        return self.verify(rows, tokens)

    def draft_s(self, policy: DraftPolicy, rows: int) -> float:
        """One draft position for ``rows`` rows of ``policy``: the kept share of its precision's forward (none
        for a policy that drafts only by lookup)."""
        if not policy.drafts_with_model:
            return 0.0
        kept = 1.0 - len(policy.skip) / (2 * self.num_layers)
        full = self.verify_s(rows, rows) if policy.precision == "full" else self.drafts[policy.precision](rows, rows)
        return kept * full

    def describe(self) -> str:
        drafts = "".join(f"; {p} draft s = {cost.describe('rows')}" for p, cost in self.drafts.items())
        return f"verify s = {self.verify.describe('tokens')}{drafts}"


@torch.inference_mode()
def measure_step_costs(runner: ModelRunner, context: int = 128, rows: tuple[int, ...] = (1, 2, 4, 8, 16),
                       drafts: tuple[int, ...] = (0, 2, 4, 8), repeats: int = 2) -> StepCosts:
    """Time packed verify forwards (rows x draft length) and each quantised precision's draft forwards at
    ``context`` cached tokens."""
    caches = [runner.new_cache(context + max(drafts) + 1) for _ in range(max(rows))]

    def seconds(segs: list[Segment], policy: DraftPolicy | None = None) -> float:
        def run() -> None:
            runner.forward_packed(segs, policy)
            wait_for(runner.device)
        return median_ms(run, repeats) / 1000

    verify_rows, verify_tokens, verify_seconds = [], [], []
    for b in rows:
        for k in drafts:
            segs = [Segment(torch.randint(10, 1000, (k + 1,), device=runner.device), caches[i], context,
                            all_logits=k > 0) for i in range(b)]
            verify_rows.append(b)
            verify_tokens.append(b * (k + 1))
            verify_seconds.append(seconds(segs))
    drafts = {}
    for precision in runner.quantised_precisions:
        policy, draft_seconds = DraftPolicy(precision=precision), []
        for b in rows:
            segs = [Segment(torch.randint(10, 1000, (1,), device=runner.device), caches[i], context) for i in range(b)]
            draft_seconds.append(seconds(segs, policy))
        drafts[precision] = HingeCost.fit(list(rows), list(rows), draft_seconds, per_row=False)
    return StepCosts(HingeCost.fit(verify_rows, verify_tokens, verify_seconds), drafts, runner.num_layers)


class SpeculationPlanner:
    """Chooses the draft-length cap of each batched step (None: every row drafts as its policy says)."""

    def __init__(self, costs: StepCosts) -> None:
        self.costs = costs

    def cap(self, seqs: list[Sequence], most: int | None = None) -> int | None:
        """The cap with the highest expected tokens/s for this batch; a lone row decodes as calibrated.

        ``most``: the drafts a row can make this step anyway (1 while requests wait for their
        prefill, see ``SpeculativeEngine.step_batch``), so the choice is between what can run.
        """
        speculative = [s for s in seqs if s.policy.drafts_with_model]  # lookup drafts are free: ``trim`` bounds them
        if len(seqs) <= 1 or not speculative:
            return None
        longest = max(s.policy.max_draft for s in speculative)
        limit = longest if most is None else min(longest, most)
        best_cap, best_rate = None, -1.0
        for cap in [c for c in CAP_CANDIDATES if c < limit] + [limit]:
            rate = self.expected_rate(seqs, cap)
            if rate > best_rate * 1.0001:
                best_cap, best_rate = cap, rate
        return None if best_cap == longest else best_cap

    def trim(self, seqs: list[Sequence], drafted: list[int], whole: list[bool] | None = None) -> list[int]:
        """How many of each row's ``drafted`` tokens to verify: the most likely to be accepted first, as many as
        maximise the batch's expected tokens per second of verify.

        A row's j-th draft is accepted with probability ``alpha ** j``, so the candidates in order of that
        value keep every row's prefix; the drafting is spent already, only the verify's cost counts. Rows
        marked in ``whole`` verify all their drafts (they count in the cost, and are never cut). A lone row
        verifies its model drafts as calibrated, but its n-gram lookup drafts are trimmed too: their
        acceptance follows the text far more than the calibration can see (MT-bench chat 0.15-0.25 on the
        native 1.5B, where each verified draft costs about a fifth of a step; copy-heavy prompts 0.5 and more).
        """
        rows = len(seqs)
        whole = whole or [False] * rows
        if (rows <= 1 and seqs[0].policy.drafts_with_model) or not any(d for d, w in zip(drafted, whole) if not w):
            return drafted
        alphas = [row_acceptance(seq) for seq in seqs]
        keep = [d if w else 0 for d, w in zip(drafted, whole)]
        fixed = sum(keep)
        tokens = rows + sum(expected_accepted(alphas[i], d) for i, d in enumerate(keep))
        candidates = sorted(((alphas[i] ** j, i) for i, d in enumerate(drafted) if not whole[i]
                             for j in range(1, d + 1)), key=lambda gain_row: -gain_row[0])

        def rate(expected: float, drafts: int) -> float:
            return expected / max(self.costs.verify_s(rows, rows + fixed + drafts), 1e-9)

        best, best_rate = 0, rate(tokens, 0)
        for n, (gain, _) in enumerate(candidates, start=1):
            tokens += gain
            rate_n = rate(tokens, n)
            if rate_n > best_rate * 1.0001:
                best, best_rate = n, rate_n
        for _, i in candidates[:best]:
            keep[i] += 1
        return keep

    def expected_rate(self, seqs: list[Sequence], cap: int) -> float:
        """Expected tokens per second of one step of ``seqs`` with draft lengths capped at ``cap``."""
        tokens, verify_tokens = 0.0, 0.0
        longest_in_group: dict[DraftPolicy, float] = {}
        rows_in_group: dict[DraftPolicy, int] = {}
        for seq in seqs:
            drafted = 0.0
            if seq.policy.drafts_with_model:
                s = seq.stats
                usual = s.draft_tokens / s.draft_steps if s.draft_steps else seq.policy.max_draft
                drafted = min(usual, cap, seq.policy.max_draft)
                tokens += expected_accepted(row_acceptance(seq), drafted)
                if drafted > 0:
                    longest_in_group[seq.policy] = max(longest_in_group.get(seq.policy, 0.0), drafted)
                    rows_in_group[seq.policy] = rows_in_group.get(seq.policy, 0) + 1
            tokens += 1.0
            verify_tokens += 1.0 + drafted
        seconds = self.costs.verify_s(len(seqs), round(verify_tokens))
        seconds += sum(self.costs.draft_s(p, rows_in_group[p]) * n for p, n in longest_in_group.items())
        return tokens / seconds if seconds > 0 else 0.0


def token_acceptance(stats: RequestStats, hits: int = 0, misses: int = 0) -> float:
    """Per-token acceptance of a row's drafts: drafts are accepted one after another until the first
    rejection, so the estimate is accepted / (accepted + rejections), with a prior of 0.7; ``hits`` and
    ``misses`` add unverified drafts' first tokens, one-token trials."""
    accepted = stats.accepted_tokens + hits + PRIOR_ACCEPTED
    return accepted / (accepted + stats.draft_rejections + misses + PRIOR_REJECTIONS)


def row_acceptance(seq: Sequence) -> float:
    """``token_acceptance`` of a row's verified drafts and of the first tokens of those left unverified (so a
    row whose drafts stopped paying can earn them back)."""
    return token_acceptance(seq.stats, seq.unverified_hits, seq.unverified_misses)


def expected_accepted(alpha: float, drafted: float) -> float:
    """Expected accepted tokens of ``drafted`` drafts accepted in order, each with probability ``alpha``."""
    if drafted <= 0:
        return 0.0
    if alpha >= 1.0:
        return drafted
    return alpha * (1.0 - alpha ** drafted) / (1.0 - alpha)
