"""Log-probabilities of committed tokens under the full model (OpenAI's ``logprobs``).

Every committed token, drafted or not, was checked against logits of the full model: the
verify forward's row for its position (or the prefill's last row for the first token). Its
log-probability is read from those logits, so speculative and plain decoding report the same
numbers, bit for bit where the forward is batch-invariant. The distribution is the model's own
(log-softmax of the raw logits, before temperature, top-k and top-p), as vLLM reports by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability and the ``top`` most likely tokens at its position (a prompt's first
    token has neither: ``logprob`` None)."""

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, token_ids: list[int], top: int) -> list[TokenLogprob]:
    """``token_ids[i]``'s log-probability under row ``i`` of ``logits`` (rows x vocab), with the ``top`` best."""
    if not token_ids:
        return []
    logp = torch.log_softmax(logits[: len(token_ids)].float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(token_ids, device=logp.device)[:, None])[:, 0].tolist()
    if top <= 0:
        return [TokenLogprob(t, lp) for t, lp in zip(token_ids, chosen)]
    values, indices = torch.topk(logp, min(top, logp.shape[-1]), dim=-1)
    return [TokenLogprob(t, lp, tuple(zip(ids, vals)))
            for t, lp, ids, vals in zip(token_ids, chosen, indices.tolist(), values.tolist())]
