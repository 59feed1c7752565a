"""Step costs measured on this machine, the currency of the policy search."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from decoding import DraftPolicy, ModelRunner, SkipSet
from decoding.benchmark import median_ms

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
        for lo, hi in zip(points, points[1:]):
            if k <= hi:
                return self.verify[lo] + (self.verify[hi] - self.verify[lo]) * (k - lo) / (hi - lo)
        return self.verify[points[-1]]

    def draft_ms(self, policy: DraftPolicy) -> float:
        return self.draft[policy.precision].ms(self.num_layers, policy.skip)

    def to_dict(self) -> dict:
        return {"verify_ms": self.verify, "draft_ms": {k: asdict(v) for k, v in self.draft.items()},
                "num_layers": self.num_layers}


def measure_costs(runner: ModelRunner, context: int = 256, repeats: int = 9) -> StepCosts:
    """Time full forwards of 1..13 tokens and draft forwards (full and int8) at ``context`` cached tokens."""
    cache = runner.new_cache(context + 16)
    runner.forward(torch.randint(10, 1000, (context,)), cache, 0)
    verify = {}
    for k in VERIFY_POINTS:
        tokens = torch.randint(10, 1000, (k,))
        verify[k] = median_ms(lambda: runner.forward(tokens, cache, context, all_logits=k > 1), repeats)
    one = torch.tensor([42])
    layers = range(runner.num_layers)
    precisions = ["full"] + (["int8"] if runner.draft_lm_head is not None else [])
    draft = {}
    for precision in precisions:
        def timed(skip: SkipSet) -> float:
            policy = DraftPolicy(skip, precision=precision)
            return median_ms(lambda: runner.forward(one, cache, context, policy=policy), repeats)
        whole = timed(SkipSet())
        no_attention = timed(SkipSet(attention=layers))
        no_mlp = timed(SkipSet(mlp=layers))
        n = runner.num_layers
        attention = max(0.0, (whole - no_attention) / n)
        mlp = max(0.0, (whole - no_mlp) / n)
        draft[precision] = DraftCost(base=max(0.0, whole - n * (attention + mlp)), attention=attention, mlp=mlp)
    return StepCosts(verify, draft, runner.num_layers)
