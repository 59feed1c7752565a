"""Where a speculative greedy output parts from plain greedy decoding, and whether rounding explains it.

A k-token verify on kernels that are not batch-invariant (torch's on CUDA, say) rounds a position's
logits differently from a one-token step, so in a low-precision dtype greedy paths can part where
the full model's two best logits are within rounding of each other: a near-tie. A divergence at a
wider gap is a bug.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .engine import SpeculativeEngine

# A divergence counts as a near-tie when the full model's top-1/top-2 logit gap is within this many
# units of least precision (eps * |top-1 logit|) of the dtype.
TIE_ULPS = 4


def tie_tolerance(dtype: torch.dtype, top1: float) -> float:
    """Largest logit gap a rounding difference of ``dtype`` can flip; 0 in fp32, where outputs must match."""
    if dtype == torch.float32:
        return 0.0
    return TIE_ULPS * torch.finfo(dtype).eps * max(abs(top1), 1.0)


def logit_gap(engine: SpeculativeEngine, ids: Sequence[int], output: Sequence[int], position: int) -> dict[str, float]:
    """The full model's top-1/top-2 logits where plain decoding produced ``output[position]``."""
    runner = engine.runner
    context = list(ids) + list(output[:position])
    cache = runner.new_cache(len(context) + 1)
    logits = runner.forward(torch.tensor(context, device=runner.device), cache, 0).logits[-1].float()
    top = torch.topk(logits, 2).values
    return {"top1": float(top[0]), "top2": float(top[1]), "gap": float(top[0] - top[1])}


def divergence(engine: SpeculativeEngine, ids: Sequence[int], plain: Sequence[int],
               other: Sequence[int]) -> dict[str, Any] | None:
    """None where ``other`` equals the plain greedy output ``plain`` of prompt ``ids``; else the first
    differing ``position``, the full model's logit gap there, the ``tolerance`` and ``near_tie``
    (tolerance 0 where the runner is batch-invariant: then every output must match)."""
    if list(other) == list(plain):
        return None
    position = next((j for j, (a, b) in enumerate(zip(other, plain)) if a != b), min(len(other), len(plain)))
    gap = logit_gap(engine, ids, plain, position)
    runner = engine.runner
    tolerance = 0.0 if runner.batch_invariant else tie_tolerance(runner.dtype, gap["top1"])
    return {"position": position, **gap, "tolerance": tolerance, "near_tie": gap["gap"] <= tolerance}
