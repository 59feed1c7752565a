"""The self-speculative decoding loop (one sequence at a time, step by step).

A step drafts up to ``max_draft`` tokens with the request's draft policy, verifies
them with one full forward and commits the accepted prefix plus the full model's
own next token. Plain decoding (no policy, ``speculate=False``) runs in the same loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from .detokenizer import IncrementalDetokenizer, StopMatcher
from .kv_cache import KVCache
from .policy import MAX_DRAFT_LIMIT, PLAIN, DraftPolicy
from .runner import ModelRunner
from .sampling import SamplingParams, accept_greedy, accept_sampled, make_generator, sample, target_probs
from .stats import RequestStats


class PromptTooLongError(ValueError):
    """The prompt leaves no room for a generated token in the model's context."""


@dataclass
class Sequence:
    """One request's decoding state.

    ``tokens`` holds prompt and committed generated tokens. The KV cache holds
    full-model entries for every token but the newest, which the next forward writes:
    ``cache.length == len(tokens) - 1`` between steps.
    """

    prompt_len: int
    params: SamplingParams
    cache: KVCache
    tokens: list[int]
    generator: torch.Generator
    detokenizer: IncrementalDetokenizer
    stopper: StopMatcher
    embedding: torch.Tensor
    policy: DraftPolicy = PLAIN
    stats: RequestStats = field(default_factory=RequestStats)
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def text(self) -> str:
        return self.stopper.text


@dataclass(frozen=True)
class StepOutput:
    """What one step committed: new token ids, the text now safe to emit, and whether it ended."""

    token_ids: list[int]
    text: str
    finish_reason: str | None


class SpeculativeEngine:
    """Prefill and step sequences with self-speculative decoding."""

    def __init__(self, runner: ModelRunner, tokenizer: Any, max_context: int | None = None) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_context = min(max_context or runner.max_context, runner.max_context)
        eos = getattr(runner.model.generation_config, "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {t for t in [*eos, tokenizer.eos_token_id] if t is not None}

    # ------------------------------------------------------------------ lifecycle
    def start(self, prompt_ids: list[int], params: SamplingParams) -> tuple[Sequence, StepOutput]:
        """Prefill the prompt with the full model and sample the first token.

        The returned sequence carries the prompt embedding for routing; set its
        ``policy`` before calling ``step``.
        """
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.max_context:
            raise PromptTooLongError(
                f"the prompt has {n} tokens but the model's context is {self.max_context}: no room to generate")
        capacity = min(n + params.max_tokens, self.max_context) + MAX_DRAFT_LIMIT + 1
        cache = self.runner.new_cache(capacity)
        t0 = time.perf_counter()
        out = self.runner.forward(torch.tensor(prompt_ids, device=self.runner.device), cache, 0, embedding=True)
        cache.commit(n)
        seq = Sequence(
            prompt_len=n, params=params, cache=cache, tokens=list(prompt_ids),
            generator=make_generator(params.seed, self.runner.device),
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids),
            stopper=StopMatcher(params.stop), embedding=out.embedding,
            stats=RequestStats(prompt_tokens=n),
        )
        first = self._choose(out.logits[-1], seq)
        seq.stats.prefill_s = time.perf_counter() - t0
        return seq, self._commit(seq, [first])

    def step(self, seq: Sequence) -> StepOutput:
        """Advance ``seq`` by one draft-and-verify step (one plain step if its policy is plain)."""
        if seq.finished:
            raise RuntimeError("step() on a finished sequence")
        start = seq.cache.length
        drafts, draft_probs = self._draft(seq, start)
        t0 = time.perf_counter()
        inputs = torch.tensor([seq.tokens[-1], *drafts], device=self.runner.device)
        logits = self.runner.forward(inputs, seq.cache, start, all_logits=bool(drafts)).logits
        if seq.params.greedy:
            accepted, bonus = accept_greedy(drafts, logits)
        elif drafts:
            target = target_probs(logits, seq.params)
            accepted, bonus = accept_sampled(drafts, draft_probs, target, seq.generator)
        else:
            accepted, bonus = 0, sample(target_probs(logits[-1], seq.params), seq.generator)
        seq.cache.commit(start + 1 + accepted)
        stats = seq.stats
        stats.verify_s += time.perf_counter() - t0
        stats.verify_steps += 1
        stats.draft_tokens += len(drafts)
        stats.accepted_tokens += accepted
        stats.step_tokens += accepted + 1
        return self._commit(seq, drafts[:accepted] + [bonus])

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 policy: DraftPolicy | Callable[[torch.Tensor], DraftPolicy] = PLAIN) -> Iterator[StepOutput]:
        """Decode to the end, yielding each step's output.

        ``policy`` is a draft policy or a function of the prompt embedding that
        returns one (the router). The finished ``Sequence`` is the generator's return value.
        """
        seq, out = self.start(prompt_ids, params)
        seq.policy = (policy if isinstance(policy, DraftPolicy) else policy(seq.embedding)).validate(
            self.runner.num_layers)
        yield out
        while not seq.finished:
            yield self.step(seq)
        return seq

    def run(self, prompt_ids: list[int], params: SamplingParams,
            policy: DraftPolicy | Callable[[torch.Tensor], DraftPolicy] = PLAIN) -> Sequence:
        """Decode to the end and return the finished sequence."""
        gen = self.generate(prompt_ids, params, policy)
        while True:
            try:
                next(gen)
            except StopIteration as done:
                return done.value

    # ------------------------------------------------------------------ internals
    def _draft(self, seq: Sequence, start: int) -> tuple[list[int], torch.Tensor | None]:
        """Draft tokens after ``seq.tokens[-1]`` with the sequence's policy."""
        policy = seq.policy
        room = min(policy.max_draft,
                   seq.params.max_tokens - len(seq.generated) - 1,
                   self.max_context - len(seq.tokens) - 1,
                   seq.cache.capacity - start - 1)
        if policy.is_plain or room <= 0:
            return [], None
        t0 = time.perf_counter()
        drafts: list[int] = []
        probs: list[torch.Tensor] = []
        token = seq.tokens[-1]
        for j in range(room):
            logits = self.runner.forward(torch.tensor([token], device=self.runner.device), seq.cache,
                                         start + j, policy=policy).logits[-1]
            if seq.params.greedy:
                token = int(logits.argmax())
                confidence = float(torch.softmax(logits, dim=-1)[token])
            else:
                q = target_probs(logits, seq.params)
                token = sample(q, seq.generator)
                probs.append(q)
                confidence = float(q.max())
            drafts.append(token)
            if confidence < policy.threshold or (token in self.eos_ids and not seq.params.ignore_eos):
                break
        seq.stats.draft_s += time.perf_counter() - t0
        return drafts, torch.stack(probs) if probs else None

    def _choose(self, logits: torch.Tensor, seq: Sequence) -> int:
        if seq.params.greedy:
            return int(logits.argmax())
        return sample(target_probs(logits, seq.params), seq.generator)

    def _commit(self, seq: Sequence, new_tokens: list[int]) -> StepOutput:
        """Append tokens one by one, applying EOS, stop strings, max_tokens and the context limit."""
        committed: list[int] = []
        for token in new_tokens:
            seq.tokens.append(token)
            committed.append(token)
            seq.stats.completion_tokens += 1
            if token in self.eos_ids and not seq.params.ignore_eos:
                seq.finish_reason = "stop"
            elif seq.stopper.add(seq.detokenizer.push(token)):
                seq.finish_reason = "stop"
            elif len(seq.generated) >= seq.params.max_tokens or len(seq.tokens) >= self.max_context:
                seq.finish_reason = "length"
            if seq.finished:
                break
        seq.stats.finish_reason = seq.finish_reason
        return StepOutput(committed, seq.stopper.pop(final=seq.finished), seq.finish_reason)
