"""Sampling parameters, target/draft distributions and the speculative acceptance rules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import native
from .logprobs import MAX_TOP_LOGPROBS


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings. ``temperature`` 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # OpenAI's: subtracted from a token's logit once it was generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time it was generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    grammar: str | None = None  # an llguidance grammar the output must follow (``decoding.grammar``)
    logprobs: int | None = None  # report each token's log-probability and this many most likely tokens
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (OpenAI: echo with logprobs)
    prediction: tuple[int, ...] = ()  # tokens the output is expected to repeat (OpenAI's predicted outputs)
    embed_only: bool = False  # prefill the prompt for its embedding and generate nothing (/v1/embeddings)

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if any(not -100.0 <= bias <= 100.0 for _, bias in self.logit_bias):
            raise ValueError("logit_bias values must be in [-100, 100]")
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in self.logit_bias))
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_TOP_LOGPROBS}], got {value}")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "prediction", tuple(int(t) for t in self.prediction))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_draft_probs(self) -> bool:
        """Whether verification needs the drafts' distributions: unseeded sampling (the rejection rule); greedy
        and seeded rows only compare drafts with the target's own picks."""
        return not self.greedy and self.seed is None

    @property
    def adjusts_logits(self) -> bool:
        """Whether penalties or a logit bias change the distribution the tokens are chosen from."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A per-request RNG so that concurrent requests never share random state: an unseeded request's is
    seeded from torch's global RNG (the server seeds that at random when it starts; a test may fix it). A
    seed is taken modulo 2**64, as torch takes negative ones, so a seed near the 64-bit limit plus a
    choice's index still works."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(torch.randint(0, 2**62, ())) if seed is None else seed % 2**64)
    return gen


_MASK64 = 2**64 - 1


def position_seed(seed: int, position: int) -> int:
    """The seed of a request's draw at a token position (splitmix64 of both)."""
    x = (seed % 2**64 + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


def sample_at(probs: torch.Tensor, seed: int, position: int) -> int:
    """The token a seeded request draws at ``position`` from ``probs``: the Gumbel-max trick, argmax of log p
    plus Gumbel noise that (seed, position) fixes per token. It samples ``probs`` exactly, never a token of
    probability 0, and whatever was drafted or verified before the position; a draft drawn with the same
    noise from a close distribution mostly picks the same token, so seeded speculation keeps plain
    decoding's very tokens and still gets most drafts accepted."""
    gen = torch.Generator(device=probs.device).manual_seed(position_seed(seed, position))
    u = torch.rand(probs.shape[-1], generator=gen, device=probs.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp(min=1e-300)))
    return int(torch.argmax(torch.log(probs.double()) + gumbel))


def adjusted_logits(logits: torch.Tensor, params: SamplingParams, generated: list[int],
                    appended: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
    """``logits`` with the request's logit bias and OpenAI's presence and frequency penalties applied.

    Row ``i`` chooses the token after ``generated + appended[:i]`` (a verify step's rows follow the
    committed tokens and then the drafts), so its penalties count those tokens. Penalties count
    generated tokens only, not the prompt's, as OpenAI and vLLM do. Drafts and verification apply the
    same adjustment, so speculation stays exact for the adjusted distribution.
    """
    if not params.adjusts_logits:
        return logits
    out = logits.float().clone()
    if params.logit_bias:
        ids, biases = zip(*params.logit_bias)
        out[:, list(ids)] += torch.tensor(biases, device=out.device)
    if params.presence_penalty or params.frequency_penalty:
        vocab = out.shape[-1]
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=vocab).to(out)
        counts = counts.expand(out.shape[0], vocab).clone()
        for i, token in enumerate(appended[: out.shape[0] - 1]):
            counts[i + 1:, token] += 1
        out -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(out)
    return out


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Distribution to sample from: temperature, then top-k, then top-p (rows of ``logits``)."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, gen: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=gen))


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """The argmax of each row of ``logits`` ((V,) or (rows, V)): the first index at ties, like torch's, on the
    native kernel for float32 CPU logits (torch's argmax is several times slower there; docs/measurements.md)."""
    rows = logits.reshape(-1, logits.shape[-1])
    kernels = native.cpu_kernels() if rows.device.type == "cpu" and rows.dtype == torch.float32 else None
    return (kernels.argmax_rows(rows) if kernels is not None else rows.argmax(dim=-1)).tolist()


def accept_greedy(drafts: list[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """Longest prefix of ``drafts`` equal to the target's argmax, and the target's next token.

    ``target_logits`` has ``len(drafts) + 1`` rows. Returns ``(accepted, next_token)``.
    """
    best = greedy_tokens(target_logits)
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == best[accepted]:
        accepted += 1
    return accepted, best[accepted]


def accept_drawn(drafts: list[int], draw: Callable[[int], int]) -> tuple[int, int]:
    """Keep drafts while each equals the target's own draw at its position (``draw(i)``: the token row ``i``
    gives); the first that differs, or the token after the last draft, is that draw. The output is what
    drawing from the target token by token gives (seeded sampling: ``sample_at``)."""
    for i, token in enumerate(drafts):
        pick = draw(i)
        if pick != token:
            return i, pick
    return len(drafts), draw(len(drafts))


def accept_sampled(drafts: list[int], draft_probs: torch.Tensor, target: torch.Tensor,
                   gen: torch.Generator) -> tuple[int, int]:
    """Speculative sampling: keep draft i with probability min(1, p/q), else resample from max(0, p - q).

    ``draft_probs`` (k, V) are the distributions the drafts were sampled from, ``target``
    (k + 1, V) the target's. The output is distributed exactly as sampling from the target.
    """
    for i, token in enumerate(drafts):
        p, q = float(target[i, token]), float(draft_probs[i, token])
        if float(torch.rand((), generator=gen, device=gen.device)) * q < p:
            continue
        residual = (target[i] - draft_probs[i]).clamp(min=0)
        total = float(residual.sum())
        return i, sample(residual / total if total > 0 else target[i], gen)
    return len(drafts), sample(target[len(drafts)], gen)
