"""Continuous batching: many sequences advance together, one packed forward per phase.

Each ``ContinuousBatcher.step`` runs (1) one packed prefill forward over the next prompt
chunks of newly admitted sequences, within a per-step token budget so that a long prompt
cannot stall running sequences (chunked prefill), and (2) one batched speculative step of
every running sequence, with the draft length capped for the whole batch by the planner
before drafting and each row's drafts trimmed by it once they are known.
Sequences join and leave between steps. Outputs never depend on the batch: the packed
forwards are batch-invariant, and no row's output depends on how many tokens it drafted.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .adaptive import SpeculationPlanner
from .engine import Sequence, SpeculativeEngine, StepOutput
from .policy import DraftPolicy
from .sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class BatchStep:
    """What one ``step`` did: per-sequence outputs (or the error that sequence hit) and the batch shape."""

    outputs: list[tuple[Sequence, StepOutput | BaseException]] = field(default_factory=list)
    decode_rows: int = 0
    draft_cap: int | None = None


class ContinuousBatcher:
    """Holds the sequences in flight (prefilling, then running) and advances them one step at a time."""

    def __init__(self, engine: SpeculativeEngine, max_batch_size: int = 8, max_batched_tokens: int = 512,
                 planner: SpeculationPlanner | None = None) -> None:
        if max_batch_size < 1 or max_batched_tokens < 1:
            raise ValueError("max_batch_size and max_batched_tokens must be >= 1")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_batched_tokens = max_batched_tokens
        self.planner = planner
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []

    @property
    def size(self) -> int:
        return len(self.prefilling) + len(self.running)

    @property
    def has_room(self) -> bool:
        return self.size < self.max_batch_size

    def add(self, seq: Sequence) -> None:
        """Admit an admitted-but-not-prefilled sequence (first come, first served)."""
        if not self.has_room:
            raise RuntimeError("batch is full")
        self.prefilling.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop ``seq`` wherever it is (a cancelled request); its slot is free at once."""
        for group in (self.prefilling, self.running):
            if seq in group:
                group.remove(seq)

    def step(self, cut_drafts: Callable[[], bool] | None = None) -> BatchStep:
        """``prefill_step`` then ``decode_step``: one engine iteration."""
        result = self.prefill_step()
        decoded = self.decode_step(cut_drafts)
        decoded.outputs = result.outputs + decoded.outputs
        return decoded

    def prefill_step(self) -> BatchStep:
        """Prefill the next prompt chunks in one packed forward, within the token budget left by the running rows.

        A sequence whose prompt completes here yields its first token and joins the
        running rows: set its ``policy`` before the next ``decode_step``.
        """
        result = BatchStep()
        chunks = self._prefill_chunks(len(self.running))
        if chunks:
            for seq, out in self._guarded(self.engine.prefill, chunks, [seq for seq, _ in chunks]):
                if out is None:  # more prompt chunks to come
                    continue
                result.outputs.append((seq, out))
                self.prefilling.remove(seq)
                if not isinstance(out, BaseException) and out.finish_reason is None:
                    self.running.append(seq)
        return result

    def decode_step(self, cut_drafts: Callable[[], bool] | None = None) -> BatchStep:
        """Advance every running sequence by one batched speculative step, drafts capped and trimmed by the planner.

        ``cut_drafts`` (e.g. "a request is waiting") ends drafting early so that the step
        finishes sooner; outputs do not change (see ``SpeculativeEngine.step_batch``).
        """
        result = BatchStep()
        running = list(self.running)
        if running:
            cut_now = cut_drafts is not None and cut_drafts()
            cap = self.planner.cap(running, most=1 if cut_now else None) if self.planner else None
            result.decode_rows, result.draft_cap = len(running), cap

            trim = self.planner.trim if self.planner else None

            def step(rows: list[Sequence]) -> list[StepOutput]:
                return self.engine.step_batch(rows, cap, cut_drafts, trim)

            for seq, out in self._guarded(step, running, running):
                result.outputs.append((seq, out))
                if isinstance(out, BaseException) or out.finish_reason is not None:
                    self.running.remove(seq)
        return result

    def _prefill_chunks(self, decode_rows: int) -> list[tuple[Sequence, int]]:
        """First come, first served chunks within the token budget left after the decode rows (at least one)."""
        budget = self.max_batched_tokens - decode_rows
        chunks: list[tuple[Sequence, int]] = []
        for seq in self.prefilling:
            if chunks and budget <= 0:
                break
            if self._shares_next_block(seq, chunks):
                continue
            count = min(seq.prefill_remaining, max(budget, 1))
            chunks.append((seq, count))
            budget -= count
        return chunks

    def _shares_next_block(self, seq: Sequence, chunks: list[tuple[Sequence, int]]) -> bool:
        """With a prefix cache: whether an earlier chunk of this step is prefilling the prompt block ``seq``
        would compute next (same tokens up to its end). ``seq`` then waits and reads that block from the
        cache, so ``n`` choices of one prompt, or a burst sharing a system prompt, prefill it once."""
        cache = self.engine.prefix_cache
        if cache is None or not chunks:
            return False
        start = self.engine.prefill_position(seq)
        end = start + cache.block_tokens
        if start % cache.block_tokens or end > seq.prompt_len - 1:  # not a block the cache would serve
            return False
        head = seq.tokens[:end]
        return any(other.prefilled < end and other.tokens[:end] == head for other, _ in chunks)

    @staticmethod
    def _guarded(run: Callable, batch: list, seqs: list[Sequence]) -> list[tuple[Sequence, object]]:
        """``run(batch)`` per sequence; if the batch fails, each item alone, so one bad row fails alone."""
        try:
            return list(zip(seqs, run(batch)))
        except Exception:
            log.exception("batched forward failed; retrying its %d rows one by one", len(batch))
        out: list[tuple[Sequence, object]] = []
        for item, seq in zip(batch, seqs):
            try:
                out.append((seq, run([item])[0]))
            except Exception as exc:  # noqa: BLE001 - reported to that request only
                out.append((seq, exc))
        return out


def generate_batch(engine: SpeculativeEngine, requests: list[tuple[list[int], SamplingParams, DraftPolicy]],
                   max_batch_size: int = 8, max_batched_tokens: int = 512,
                   planner: SpeculationPlanner | None = None) -> list[Sequence]:
    """Decode ``requests`` (prompt ids, params, policy) with continuous batching; finished sequences in order."""
    batcher = ContinuousBatcher(engine, max_batch_size, max_batched_tokens, planner)
    pending = deque(enumerate(requests))
    seqs: dict[int, Sequence] = {}
    while pending or batcher.size:
        while pending and batcher.has_room:
            i, (ids, params, policy) = pending.popleft()
            seqs[i] = engine.admit(ids, params)
            seqs[i].policy = policy.validate(engine.runner.num_layers)
            batcher.add(seqs[i])
        for seq, out in batcher.step().outputs:
            if isinstance(out, BaseException):
                raise out
    return [seqs[i] for i in range(len(requests))]
