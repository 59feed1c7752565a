"""Step costs measured on this machine, the currency of the policy search."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass

from decoding import DraftPolicy, ModelRunner, SkipSet
from decoding.timing import ForwardTimers, interleaved_median_ms

VERIFY_POINTS = (1, 2, 4, 8, 13)


@dataclass(frozen=True)
class DraftCost:
    """Linear model of one draft forward: ``base + kept_attention * attention + kept_mlp * mlp`` (ms)."""

    base: float
    attention: float
    mlp: float

    def ms(self, num_layers: int, skip: SkipSet) -> float:
        return self.base + (num_layers - len(skip.attention)) * self.attention + (num_layers - len(skip.mlp)) * self.mlp


@dataclass(frozen=True)
class StepCosts:
    """Milliseconds of a full forward over k tokens and of draft forwards per precision."""

    verify: dict[int, float]
    draft: dict[str, DraftCost]
    num_layers: int

    @property
    def forward_1(self) -> float:
        return self.verify[1]

    def verify_ms(self, k: int) -> float:
        """Full forward over ``k`` tokens, linearly interpolated between measured points."""
        points = sorted(self.verify)
        if k <= points[0]:
            return self.verify[points[0]]
        for lo, hi in itertools.pairwise(points):
            if k <= hi:
                return self.verify[lo] + (self.verify[hi] - self.verify[lo]) * (k - lo) / (hi - lo)
        return self.verify[points[-1]]

    def draft_ms(self, policy: DraftPolicy) -> float:
        return self.draft[policy.precision].ms(self.num_layers, policy.skip)

    def to_dict(self) -> dict:
        return {"verify_ms": self.verify, "draft_ms": {k: asdict(v) for k, v in self.draft.items()},
                "num_layers": self.num_layers}


def measure_costs(runner: ModelRunner, context: int = 256, repeats: int = 5, rounds: int = 3) -> StepCosts:
    """Time full forwards of 1..13 tokens and draft forwards (each precision the runner serves) at
    ``context`` cached tokens.

    Every point is timed in ``rounds`` interleaved rounds and the median round kept, so
    a slow moment of the machine cannot distort one point alone; verify costs are
    then made non-decreasing in k (a longer verify never costs less).
    """
    forwards = ForwardTimers(runner, context)
    layers = range(runner.num_layers)
    timers: dict[tuple, Callable[[], object]] = {("verify", k): forwards.timer(k) for k in VERIFY_POINTS}
    precisions = runner.draft_precisions
    for precision in precisions:
        for name, skip in (("whole", SkipSet()), ("no_attention", SkipSet(attention=layers)),
                           ("no_mlp", SkipSet(mlp=layers))):
            timers[(precision, name)] = forwards.timer(1, DraftPolicy(skip, precision=precision))
    ms = interleaved_median_ms(timers, rounds, repeats)
    verify, slowest = {}, 0.0
    for k in VERIFY_POINTS:
        slowest = max(slowest, ms[("verify", k)])
        verify[k] = slowest
    n = runner.num_layers
    draft = {}
    for precision in precisions:
        draft[precision] = fit_draft_cost(ms[(precision, "whole")], ms[(precision, "no_attention")],
                                          ms[(precision, "no_mlp")], n)
    return StepCosts(verify, draft, runner.num_layers)


def fit_draft_cost(whole: float, no_attention: float, no_mlp: float, num_layers: int) -> DraftCost:
    """Per-sub-layer cost model through three measured draft forwards (ms).

    The model always reproduces ``whole`` (the draft with nothing skipped, the usual
    int8 policy). Skipping every attention or every MLP sub-layer can save more than
    their share (the rest then fits in cache), which would make the base negative:
    then the sub-layer costs are scaled down so the parts add up to ``whole``.
    """
    attention = max(0.0, (whole - no_attention) / num_layers)
    mlp = max(0.0, (whole - no_mlp) / num_layers)
    layers = num_layers * (attention + mlp)
    if layers > whole:
        return DraftCost(base=0.0, attention=attention * whole / layers, mlp=mlp * whole / layers)
    return DraftCost(base=whole - layers, attention=attention, mlp=mlp)
