"""Timing helpers shared by benchmarks, cost measurement and load-adaptive speculation."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from .policy import DraftPolicy
from .runner import ModelRunner


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``fn`` in ms over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def interleaved_median_ms(timers: dict[Any, Callable[[], Any]], rounds: int, repeats: int) -> dict[Any, float]:
    """Median ms of every timer over ``rounds`` rounds that each time all timers in turn (``median_ms``
    of ``repeats`` runs each), so a slow spell of a shared machine lands on all points alike instead
    of skewing the ratios between them."""
    samples: dict[Any, list[float]] = {key: [] for key in timers}
    for _ in range(rounds):
        for key, fn in timers.items():
            samples[key].append(median_ms(fn, repeats))
    return {key: statistics.median(values) for key, values in samples.items()}


def wait_for(device: torch.device) -> None:
    """Block until ``device`` has finished its queued work (CUDA runs asynchronously; a timer that does not
    wait measures only the kernel launches). A no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ForwardTimers:
    """Timers of single forward passes at ``context`` cached tokens of random ids, for latency tables;
    each waits for the device (``wait_for``)."""

    def __init__(self, runner: ModelRunner, context: int = 256) -> None:
        self.runner, self.context = runner, context
        self.cache = runner.new_cache(context + 16)
        runner.forward(self.tokens(context), self.cache, 0)

    def tokens(self, k: int) -> torch.Tensor:
        """``k`` random token ids on the runner's device."""
        return torch.randint(10, 1000, (k,), device=self.runner.device)

    def timer(self, k: int, policy: DraftPolicy | None = None) -> Callable[[], None]:
        """A forward of ``k`` tokens after the cached context (``policy`` None: the full model, all logits)."""
        tokens = self.tokens(k)

        def run() -> None:
            self.runner.forward(tokens, self.cache, self.context, policy=policy, all_logits=k > 1)
            wait_for(self.runner.device)
        return run
