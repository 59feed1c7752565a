"""Turn a request's speculation fields and its prompt embedding into a decoding policy."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from decoding import PLAIN, DraftPolicy, SkipSet
from knn_router.router import Router

from .engine_loop import RouteDecision
from .protocol import APIError, SamplingFields


class PolicyResolver:
    """Resolves ``speculate`` / ``domain`` / ``skip_layers`` / the router into a ``RouteDecision``.

    Without a router, speculative requests use ``fallback`` (the server's built-in policy).
    """

    def __init__(self, router: Router | None, fallback: DraftPolicy, num_layers: int,
                 precisions: tuple[str, ...] = ("full",)) -> None:
        self.router = router
        self.fallback = fallback
        self.num_layers = num_layers
        self.precisions = precisions  # the draft precisions the runner serves

    def for_request(self, req: SamplingFields) -> Callable[[torch.Tensor], RouteDecision]:
        """Validate the request's fields now (400 on error) and return the per-embedding chooser. A request
        with a predicted output (``prediction``) also drafts by lookup, whatever its policy, unless it asked
        for plain decoding."""
        choose = self._chooser(req)
        if req.speculate and getattr(req, "prediction", None) is not None:
            return lambda embedding: _with_lookup(choose(embedding))
        return choose

    def _chooser(self, req: SamplingFields) -> Callable[[torch.Tensor], RouteDecision]:
        if not req.speculate:
            return lambda _: RouteDecision(None, None, PLAIN)
        if req.skip_layers is not None:
            precision = req.draft_precision or "full"
            if precision not in self.precisions:
                served = ", ".join(self.precisions)
                raise APIError(400, f"this server has no {precision} draft copy (it serves {served})",
                               "draft_precision")
            try:
                skip = SkipSet(req.skip_layers.attention, req.skip_layers.mlp).validate(self.num_layers)
            except ValueError as exc:
                raise APIError(400, str(exc), "skip_layers") from exc
            base = self.fallback
            policy = DraftPolicy(skip, precision=precision, threshold=base.threshold, max_draft=base.max_draft)
            return lambda _: RouteDecision(None, None, policy)
        router = self.router  # read once: a SIGHUP reload may swap it (server.state.reload_router)
        if req.domain is not None:
            if router is None or req.domain not in router.policies:
                known = ", ".join(sorted(router.policies)) if router else "none (routing disabled)"
                raise APIError(400, f"unknown domain {req.domain!r}; calibrated domains: {known}", "domain")
            policy = router.policy_for(req.domain)
            return lambda _: RouteDecision(req.domain, None, policy)
        if router is None:
            return lambda _: RouteDecision(None, None, self.fallback)
        return lambda embedding: self._route(router, embedding)

    @staticmethod
    def _route(router: Router, embedding: torch.Tensor) -> RouteDecision:
        result = router.route(embedding.float().cpu().numpy())
        return RouteDecision(result.label, result.similarity, result.policy, result.lookup_ms)


def _with_lookup(decision: RouteDecision) -> RouteDecision:
    """``decision`` with lookup drafting on (a plain policy becomes lookup alone)."""
    return replace(decision, policy=replace(decision.policy, speculative=True, lookup=True))
