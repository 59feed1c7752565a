"""The self-speculative decoding loop, for one sequence or a batch of them.

A step drafts up to ``max_draft`` tokens with each sequence's draft policy (sequences
sharing a policy draft together in packed forwards), verifies every sequence's drafts
in one packed full forward and commits each accepted prefix plus the full model's own
next token. Plain decoding (no policy, ``speculate=False``) rides in the same batch.
Packed forwards are batch-invariant, so a sequence's output never depends on its batch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import torch

from .detokenizer import IncrementalDetokenizer, StopMatcher
from .grammar import GrammarCompiler, GrammarConstraint
from .kv_cache import KVCache
from .logprobs import TokenLogprob, token_logprobs
from .lookup import lookup_min_ngram, ngram_lookup, prediction_matches
from .policy import MAX_DRAFT_LIMIT, PLAIN, DraftPolicy
from .prefix_cache import BLOCK_TOKENS, CachedBlock, PrefixCache
from .runner import ForwardOutput, ModelRunner, Segment
from .sampling import (SamplingParams, accept_drawn, accept_greedy, accept_sampled, adjusted_logits, greedy_tokens,
                       make_generator, sample, sample_at, target_probs)
from .stats import RequestStats, TokenSource

log = logging.getLogger(__name__)


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
    embedding: torch.Tensor | None = None  # set when the prompt is fully prefilled
    policy: DraftPolicy = PLAIN
    prefilled: int = 0  # prompt tokens already in the cache (chunked prefill, prefix cache)
    hidden_sums: list[torch.Tensor] = field(default_factory=list)  # float64, per block of prompt positions
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # if params.prompt_logprobs is set
    grammar: GrammarConstraint | None = None  # if params.grammar is set: the output must follow it
    stats: RequestStats = field(default_factory=RequestStats)
    finish_reason: str | None = None
    # Drafts a step's planner left unverified, whose first token the step's own token confirmed or not: they
    # keep the row's acceptance estimate moving while none of its drafts is verified (``decoding.adaptive``).
    unverified_hits: int = 0
    unverified_misses: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefill_remaining(self) -> int:
        return self.prompt_len - self.prefilled

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def text(self) -> str:
        return self.stopper.text


@dataclass(frozen=True)
class StepOutput:
    """What one step committed: new token ids, the text now safe to emit, and whether it ended (with the
    tokens' log-probabilities where the request asked for them)."""

    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # with the first token, where the request asked for them
    sources: list[TokenSource] = field(default_factory=list)  # where each of token_ids came from


class SpeculativeEngine:
    """Prefill and step sequences with self-speculative decoding.

    With a ``prefix_cache``, a prompt that starts with blocks an earlier prompt prefilled
    reuses their KV entries (same output, see ``PrefixCache``) and prefills only the rest.
    The lookup runs before each prefill chunk, so a prompt also reuses blocks that a prompt
    admitted with it finished prefilling in an earlier step (a burst sharing a long system
    prompt prefills it once), and every chunk's complete blocks go to the cache at once.
    """

    def __init__(self, runner: ModelRunner, tokenizer: Any, max_context: int | None = None,
                 prefix_cache: PrefixCache | None = None) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.prefix_cache = prefix_cache
        self.block_tokens = prefix_cache.block_tokens if prefix_cache is not None else BLOCK_TOKENS
        self.max_context = min(max_context or runner.max_context, runner.max_context)
        eos = getattr(runner.model.generation_config, "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {t for t in [*eos, tokenizer.eos_token_id] if t is not None}
        self.vocab_size = runner.vocab_size
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size, self.eos_ids)

    def clear_prefix_cache(self) -> dict[str, Any]:
        """Drop every prefix cache block; what was dropped (``/reset_prefix_cache`` answers with it)."""
        cache = self.prefix_cache
        if cache is None:
            return {"enabled": False, "cleared_blocks": 0, "freed_bytes": 0}
        cleared = {"enabled": True, "cleared_blocks": len(cache), "freed_bytes": cache.nbytes}
        cache.clear()
        return cleared

    # ------------------------------------------------------------------ lifecycle
    def admit(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """Check the prompt and reserve its KV cache; nothing runs until ``prefill``."""
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n > self.max_context or (n == self.max_context and not params.embed_only):
            raise PromptTooLongError(
                f"the prompt has {n} tokens but the model's context is {self.max_context}: no room to generate")
        if any(not 0 <= token < self.vocab_size for token, _ in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {self.vocab_size})")
        grammar = None if params.grammar is None else self.grammars.constraint(params.grammar)
        capacity = min(n + params.max_tokens, self.max_context) + MAX_DRAFT_LIMIT + 1
        return Sequence(
            prompt_len=n, params=params, cache=self.runner.new_cache(capacity), tokens=list(prompt_ids),
            generator=make_generator(params.seed, self.runner.device),
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids),
            stopper=StopMatcher(params.stop), stats=RequestStats(prompt_tokens=n), grammar=grammar,
        )

    def prefill_position(self, seq: Sequence) -> int:
        """Where ``seq``'s next prefill chunk starts once it skips the blocks the prefix cache holds."""
        return seq.prefilled + len(self._cached_blocks(seq)) * self.block_tokens

    def _cached_blocks(self, seq: Sequence) -> list[CachedBlock]:
        """The cached blocks right after what ``seq`` has prefilled (never its last prompt token: its logits
        are needed); none while a partial block is being prefilled, as the cache holds only whole ones, and
        none for a sequence that needs its prompt's logits."""
        needs_logits = seq.params.prompt_logprobs is not None
        if self.prefix_cache is None or needs_logits or seq.prefilled % self.block_tokens:
            return []
        return self.prefix_cache.match(seq.tokens, seq.prompt_len - 1)[seq.prefilled // self.block_tokens:]

    def _load_prefix(self, seq: Sequence) -> None:
        """Skip ``seq`` ahead over the cached blocks after what it has prefilled, copying their entries into
        its KV cache."""
        blocks = self._cached_blocks(seq)
        if not blocks:
            return
        start, end = seq.prefilled, seq.prefilled + len(blocks) * self.block_tokens
        seq.cache.keys[:, 0, :, start:end] = torch.cat([block.keys for block in blocks], dim=2)
        seq.cache.values[:, 0, :, start:end] = torch.cat([block.values for block in blocks], dim=2)
        seq.cache.commit(end)
        seq.hidden_sums += [block.hidden_sum.clone() for block in blocks]
        seq.stats.cached_tokens += end - start
        seq.prefilled = end

    def prefill(self, chunks: list[tuple[Sequence, int]]) -> list[StepOutput | None | Exception]:
        """Prefill the next ``count`` prompt tokens of each sequence, all in one packed full forward.

        A sequence first skips over prompt blocks the prefix cache holds (its chunk is then
        clipped to what is left). A sequence whose prompt is now complete gets its prompt
        embedding (for routing; set its ``policy`` before ``step``) and its first token; the
        others get None. A sequence whose own work after the forward fails gets the exception
        instead, and the others their results (see ``step_batch``).
        """
        for seq, count in chunks:
            if count <= 0 or not seq.prefill_remaining:
                raise ValueError(f"prefill chunk of {count} tokens with {seq.prefill_remaining} left")
        t0 = time.perf_counter()
        segments, counts = [], []
        for seq, count in chunks:
            self._load_prefix(seq)  # valid progress even if the forward below fails and is retried
            count = min(count, seq.prefill_remaining)
            counts.append(count)
            ids = seq.tokens[seq.prefilled:seq.prefilled + count]
            segments.append(Segment(torch.tensor(ids, device=self.runner.device), seq.cache, seq.prefilled,
                                    all_logits=seq.params.prompt_logprobs is not None, prefill=True))
        outs = self.runner.forward_packed(segments)
        elapsed = time.perf_counter() - t0
        return [_isolated(self._finish_chunk, seq, count, out, elapsed)
                for (seq, _), count, out in zip(chunks, counts, outs)]

    def _finish_chunk(self, seq: Sequence, count: int, out: ForwardOutput, elapsed: float) -> StepOutput | None:
        """Take in one sequence's prefilled chunk; with its prompt complete, its embedding and first token."""
        self._add_hidden(seq, out.hidden)
        if seq.params.prompt_logprobs is not None:
            self._add_prompt_logprobs(seq, out.logits)
        seq.prefilled += count
        seq.cache.commit(seq.prefilled)
        seq.stats.prefill_s += elapsed
        if self.prefix_cache is not None:  # the complete blocks so far
            self.prefix_cache.insert(seq.tokens[:seq.prefilled], seq.cache, seq.hidden_sums)
        if seq.prefill_remaining:
            return None
        seq.embedding = (torch.stack(seq.hidden_sums).sum(dim=0) / seq.prompt_len).float()
        if seq.params.embed_only:
            seq.finish_reason = seq.stats.finish_reason = "stop"
            return StepOutput([], "", "stop")
        token = self._choose(out.logits[-1], seq)
        first = self._commit(seq, [token], self._logprobs(seq, out.logits[-1:], [token]), [TokenSource("prefill", 0)])
        if seq.params.prompt_logprobs is not None:
            first = replace(first, prompt_logprobs=seq.prompt_logprobs)
        return first

    @staticmethod
    def _add_prompt_logprobs(seq: Sequence, logits: torch.Tensor) -> None:
        """Log-probabilities of the prompt tokens after this chunk's positions (row i of ``logits`` predicts
        the token after position ``seq.prefilled + i``); the prompt's first token has none."""
        start = seq.prefilled
        if start == 0:
            seq.prompt_logprobs.append(TokenLogprob(seq.tokens[0], None))
        targets = seq.tokens[start + 1:min(start + logits.shape[0], seq.prompt_len - 1) + 1]
        seq.prompt_logprobs += token_logprobs(logits, targets, seq.params.prompt_logprobs)

    def _add_hidden(self, seq: Sequence, hidden: torch.Tensor) -> None:
        """Add the final hidden states of prompt positions ``seq.prefilled..`` to their blocks' float64
        sums, so the embedding (their mean) is the same however the prompt was chunked or cached."""
        b, pos, i = self.block_tokens, seq.prefilled, 0
        hidden = hidden.double()
        while i < hidden.shape[0]:
            j = min(hidden.shape[0], i + b - pos % b)
            part = hidden[i:j].sum(dim=0)
            if pos // b < len(seq.hidden_sums):
                seq.hidden_sums[pos // b] += part
            else:
                seq.hidden_sums.append(part)
            pos, i = pos + j - i, j

    def start(self, prompt_ids: list[int], params: SamplingParams) -> tuple[Sequence, StepOutput]:
        """Admit and prefill one prompt in one forward; returns the sequence and its first token."""
        seq = self.admit(prompt_ids, params)
        return seq, _raised(self.prefill([(seq, seq.prefill_remaining)])[0])

    def step(self, seq: Sequence) -> StepOutput:
        """Advance ``seq`` by one draft-and-verify step (one plain step if its policy is plain)."""
        return _raised(self.step_batch([seq])[0])

    def step_batch(self, seqs: list[Sequence], draft_cap: int | None = None,
                   cut_drafts: Callable[[], bool] | None = None,
                   trim: Callable[[list[Sequence], list[int], list[bool]], list[int]] | None = None,
                   ) -> list[StepOutput | Exception]:
        """Advance every sequence by one step: grouped drafts, one packed verify, per-row acceptance.

        ``draft_cap`` bounds every row's draft length, when ``cut_drafts()`` turns true
        between draft positions (e.g. a request is waiting for its prefill) the rows stop
        drafting and the step verifies at once, and ``trim(seqs, drafted, whole)`` says how many of
        each row's drafted tokens to verify: no row's output depends on its draft length (greedy rows
        take the argmax, seeded sampling rows each position's own draw). Unseeded sampling rows keep the
        target distribution as long as whether a draft is verified never depends on that draft's own
        token: their n-gram drafts are functions of the context, but a model draft drawn from the draft
        distribution is verified ``whole`` (how many more were drafted after a token can depend on it).

        A row whose acceptance fails gets the exception in place of its output; the other rows
        commit as usual. If drafting or the verify forward raises, nothing was committed (every
        grammar is back at its committed state), so the caller may retry the rows apart.
        """
        for seq in seqs:
            if seq.finished or seq.prefill_remaining:
                raise RuntimeError("step on a finished or not fully prefilled sequence")
        starts = [seq.cache.length for seq in seqs]
        drafts, draft_probs, kinds = self._draft_batch(seqs, starts, draft_cap, cut_drafts)
        unverified: list[int | None] = [None] * len(seqs)
        if trim is not None:
            whole = [kind == "draft" and seq.params.needs_draft_probs for seq, kind in zip(seqs, kinds)]
            keep = trim(seqs, [len(d) for d in drafts], whole)
            unverified = [d[0] if d and not n else None for d, n in zip(drafts, keep)]
            drafts = [d[:n] for d, n in zip(drafts, keep)]
            draft_probs = [p[:n] if p is not None and n else None for p, n in zip(draft_probs, keep)]
        t0 = time.perf_counter()
        segments = [Segment(torch.tensor([seq.tokens[-1], *d], device=self.runner.device), seq.cache, start,
                            all_logits=bool(d)) for seq, start, d in zip(seqs, starts, drafts)]
        outs = self.runner.forward_packed(segments)
        elapsed = time.perf_counter() - t0
        results = [_isolated(self._accept, seq, start, d, probs, out.logits, elapsed, kind)
                   for seq, start, d, probs, out, kind in zip(seqs, starts, drafts, draft_probs, outs, kinds)]
        for seq, first, result in zip(seqs, unverified, results):
            if first is not None and isinstance(result, StepOutput) and result.token_ids:
                if result.token_ids[0] == first:
                    seq.unverified_hits += 1
                else:
                    seq.unverified_misses += 1
        return results

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
    def _accept(self, seq: Sequence, start: int, drafts: list[int], draft_probs: torch.Tensor | None,
                logits: torch.Tensor, verify_s: float, draft_kind: str = "draft") -> StepOutput:
        """Apply the acceptance rule to one row's verified drafts (``draft_kind``: by the model, ``draft``, or
        by n-gram ``lookup``) and commit the result."""
        chosen_from = adjusted_logits(logits, seq.params, seq.generated, drafts)  # logits unless penalised/biased
        if seq.grammar is not None:
            chosen_from = seq.grammar.mask(chosen_from, drafts)
        if seq.params.greedy:
            accepted, bonus = accept_greedy(drafts, chosen_from)
        else:
            target = target_probs(chosen_from, seq.params)
            if drafts and seq.params.needs_draft_probs:
                accepted, bonus = accept_sampled(drafts, draft_probs, target, seq.generator)
            else:  # a seeded row keeps the drafts its own position draws confirm: plain decoding's tokens
                accepted, bonus = accept_drawn(drafts, lambda i: self._draw(seq, target[i], start + 1 + i))
        seq.cache.commit(start + 1 + accepted)
        stats = seq.stats
        stats.verify_s += verify_s
        stats.verify_steps += 1
        stats.draft_tokens += len(drafts)
        stats.lookup_tokens += len(drafts) if draft_kind == "lookup" else 0
        stats.accepted_tokens += accepted
        stats.draft_steps += bool(drafts)
        stats.draft_rejections += accepted < len(drafts)
        stats.step_tokens += accepted + 1
        tokens = drafts[:accepted] + [bonus]
        step = stats.verify_steps
        sources = [TokenSource(draft_kind, step)] * accepted + [TokenSource("verify" if drafts else "plain", step)]
        return self._commit(seq, tokens, self._logprobs(seq, logits, tokens), sources)

    @staticmethod
    def _logprobs(seq: Sequence, logits: torch.Tensor, tokens: list[int]) -> list[TokenLogprob] | None:
        """The log-probabilities of ``tokens`` (row i of ``logits`` chose token i), if ``seq`` asked for them."""
        return None if seq.params.logprobs is None else token_logprobs(logits, tokens, seq.params.logprobs)

    def _draft_room(self, seq: Sequence, start: int, cap: int | None) -> int:
        policy = seq.policy
        if policy.is_plain:
            return 0
        room = min(policy.max_draft,
                   seq.params.max_tokens - len(seq.generated) - 1,
                   self.max_context - len(seq.tokens) - 1,
                   seq.cache.capacity - start - 1)
        if cap is not None:
            room = min(room, cap)
        return room

    def _draft_batch(self, seqs: list[Sequence], starts: list[int], cap: int | None,
                     cut: Callable[[], bool] | None = None,
                     ) -> tuple[list[list[int]], list[torch.Tensor | None], list[str]]:
        """Draft for every row: by n-gram lookup where the policy asks for it and a match exists, else with the
        model, rows sharing a policy together, one packed draft forward per position. Returns the drafts, their
        distributions (sampling rows) and how each row drafted (``lookup`` or ``draft``)."""
        drafts: list[list[int]] = [[] for _ in seqs]
        kinds = ["draft"] * len(seqs)
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        rooms = [self._draft_room(seq, start, cap) for seq, start in zip(seqs, starts)]
        groups: dict[DraftPolicy, list[int]] = {}
        try:
            for i, seq in enumerate(seqs):
                if rooms[i] <= 0:
                    continue
                if seq.policy.lookup and self._draft_by_lookup(seq, rooms[i], drafts[i], probs[i]):
                    kinds[i] = "lookup"
                    continue  # drafted without a forward pass
                if seq.policy.drafts_with_model:
                    groups.setdefault(seq.policy, []).append(i)
            for policy, active in groups.items():
                t0 = time.perf_counter()
                while active:
                    segments = [Segment(torch.tensor([seqs[i].tokens[-1] if not drafts[i] else drafts[i][-1]],
                                                     device=self.runner.device), seqs[i].cache,
                                        starts[i] + len(drafts[i])) for i in active]
                    outs = self.runner.forward_packed(segments, policy)
                    still = [i for i, out in zip(active, outs) if self._draft_one(
                        seqs[i], out.logits[-1], drafts[i], probs[i]) and len(drafts[i]) < rooms[i]]
                    active = [] if still and cut is not None and cut() else still
                elapsed = time.perf_counter() - t0
                for i in groups[policy]:
                    seqs[i].stats.draft_s += elapsed
        finally:  # back to the committed tokens (verification re-reads the drafts), also when drafting fails
            for seq, d in zip(seqs, drafts):
                if seq.grammar is not None:
                    seq.grammar.retract(len(d))
        return drafts, [torch.stack(p) if p else None for p in probs], kinds

    def _draft_by_lookup(self, seq: Sequence, room: int, drafts: list[int], probs: list[torch.Tensor]) -> bool:
        """Draft the tokens an n-gram lookup finds (``decoding.lookup``); False when it finds none.

        The draft is a function of the tokens so far, so for sampling rows its distribution is the
        point mass on each drafted token and speculative sampling keeps the target distribution."""
        min_ngram = lookup_min_ngram(seq.policy.drafts_with_model)
        for token in ngram_lookup(seq.tokens, room, seq.params.prediction, min_ngram):
            if seq.grammar is not None and not seq.grammar.advance(token):
                break
            drafts.append(token)
            if seq.params.needs_draft_probs:
                point = torch.zeros(self.vocab_size, device=self.runner.device)
                point[token] = 1.0
                probs.append(point)
            ended = token in self.eos_ids and not seq.params.ignore_eos
            if ended or (seq.grammar is not None and seq.grammar.stopped):
                break
        return bool(drafts)

    def _draft_one(self, seq: Sequence, logits: torch.Tensor, drafts: list[int], probs: list[torch.Tensor]) -> bool:
        """Append one draft token chosen from ``logits``; False when drafting should stop here.

        A constrained row's grammar consumes the draft (``_draft_batch`` rolls the drafts back)."""
        if seq.params.adjusts_logits:  # the row after the committed tokens and the drafts so far
            logits = adjusted_logits(logits[None], seq.params, seq.generated + drafts)[0]
        if seq.grammar is not None:
            logits = seq.grammar.mask(logits[None])[0]
        if seq.params.greedy:
            token = greedy_tokens(logits)[0]
            # the draft's top-1 probability matters only against a threshold (a softmax over the vocabulary)
            confidence = float(torch.softmax(logits, dim=-1)[token]) if seq.policy.threshold > 0 else 1.0
            q = None
        else:
            q = target_probs(logits, seq.params)
            token = self._draw(seq, q, len(seq.tokens) + len(drafts))
            confidence = float(q.max())
        if seq.grammar is not None and not seq.grammar.advance(token):
            return False  # the grammar ended before this position: nothing more to draft
        drafts.append(token)
        if seq.params.needs_draft_probs:
            probs.append(q)
        ended = token in self.eos_ids and not seq.params.ignore_eos
        return not (confidence < seq.policy.threshold or ended or (seq.grammar is not None and seq.grammar.stopped))

    def _choose(self, logits: torch.Tensor, seq: Sequence) -> int:
        """The first generated token, from the prompt's last logits."""
        logits = adjusted_logits(logits[None], seq.params, seq.generated)[0]  # nothing generated yet: the bias
        if seq.grammar is not None:
            logits = seq.grammar.mask(logits[None])[0]
        if seq.params.greedy:
            return greedy_tokens(logits)[0]
        return self._draw(seq, target_probs(logits, seq.params), len(seq.tokens))

    @staticmethod
    def _draw(seq: Sequence, probs: torch.Tensor, position: int) -> int:
        """Sample the token at sequence ``position`` from ``probs``: with the draw the request's seed fixes for
        that position (so a seeded row's tokens never depend on its drafts), else from its generator."""
        if seq.params.seed is not None:
            return sample_at(probs, seq.params.seed, position)
        return sample(probs, seq.generator)

    @staticmethod
    def _completes_grammar(seq: Sequence, token: int) -> bool:
        """Advance a constrained row's grammar by a committed token; True when the grammar is complete."""
        return seq.grammar is not None and seq.grammar.advance(token) and seq.grammar.stopped

    def _commit(self, seq: Sequence, new_tokens: list[int], logprobs: list[TokenLogprob] | None,
                sources: list[TokenSource]) -> StepOutput:
        """Append tokens one by one, applying EOS, stop strings, max_tokens and the context limit."""
        committed: list[int] = []
        for token in new_tokens:
            seq.tokens.append(token)
            committed.append(token)
            seq.stats.completion_tokens += 1
            if token in self.eos_ids and not seq.params.ignore_eos:
                seq.finish_reason = "stop"
            elif seq.stopper.add(seq.detokenizer.push(token)) or self._completes_grammar(seq, token):
                seq.finish_reason = "stop"
            elif len(seq.generated) >= seq.params.max_tokens or len(seq.tokens) >= self.max_context:
                seq.finish_reason = "length"
            if seq.finished:
                break
        seq.stats.finish_reason = seq.finish_reason
        if seq.finished and seq.params.prediction:
            matched = prediction_matches(seq.params.prediction, seq.generated)
            seq.stats.accepted_prediction_tokens = matched
            seq.stats.rejected_prediction_tokens = len(seq.params.prediction) - matched
        return StepOutput(committed, seq.stopper.pop(final=seq.finished), seq.finish_reason,
                          None if logprobs is None else logprobs[:len(committed)], sources=sources[:len(committed)])


def _isolated(work: Callable[..., StepOutput | None], seq: Sequence, *args: Any) -> StepOutput | None | Exception:
    """``work(seq, *args)``, or the exception it raised: one row's failure must not undo or repeat the
    other rows of its batch, which have committed their tokens by then."""
    try:
        return work(seq, *args)
    except Exception as exc:  # noqa: BLE001 - handed to that row's caller
        log.exception("a row of the batch failed; the other rows go on")
        return exc


def _raised(result: StepOutput | None | Exception) -> StepOutput | None:
    """``result``, raising it if it is a row's exception."""
    if isinstance(result, Exception):
        raise result
    return result
