"""The engine loop: one thread owns the model and advances all admitted requests together.

Requests wait in a first-come-first-served queue until the continuous batcher has a
slot; then they are prefilled (in chunks within a per-step token budget), routed by
their prompt embedding, and decoded in batched speculative steps.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from decoding import (
    DraftPolicy,
    RequestStats,
    SamplingParams,
    Sequence,
    SpeculativeEngine,
    StepOutput,
    TokenLogprob,
    TokenSource,
)
from decoding.batching import ContinuousBatcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouteDecision:
    """Which policy a request decodes with, and why."""

    domain: str | None
    similarity: float | None
    policy: DraftPolicy
    router_ms: float = 0.0


@dataclass
class GenerationEvent:
    """Output pushed to a request's consumer after each engine step."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # of token_ids, where the request asked for them
    prompt_logprobs: list[TokenLogprob] | None = None  # of the prompt, with the first token, where asked for
    finish_reason: str | None = None
    route: RouteDecision | None = None
    stats: RequestStats | None = None
    error: BaseException | None = None
    embedding: torch.Tensor | None = None  # the prompt embedding, for an embedding request (``embed_only``)
    sources: list[TokenSource] = field(default_factory=list)  # where each of token_ids came from


@dataclass
class GenerationRequest:
    """One sequence to generate (a choice of an API request)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    choose_policy: Callable[[torch.Tensor], RouteDecision]
    emit: Callable[[GenerationEvent], None]
    arrival: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # engine-side state
    seq: Sequence | None = None
    route: RouteDecision | None = None
    admitted: float = 0.0
    first_output: float = 0.0
    last_output: float = 0.0

    def summary(self) -> str:
        """One log line on how a finished (or aborted) request went: sizes, route, speculation, timings."""
        stats, route = self.seq.stats, self.route
        policy = route.policy
        lookup = f", {stats.lookup_tokens} drafted by lookup" if policy.lookup else ""
        how = policy.describe() if policy.is_plain else (
            f"{policy.describe()}{lookup}, {stats.mean_accepted_tokens:.1f} tokens per step, acceptance "
            f"{stats.acceptance_rate:.2f}")
        cached = f" ({stats.cached_tokens} cached)" if stats.cached_tokens else ""
        return (f"request {self.request_id} {stats.finish_reason}: {stats.prompt_tokens} prompt tokens{cached}, "
                f"{stats.completion_tokens} generated; domain {route.domain or '-'}, {how}; queued "
                f"{self.admitted - self.arrival:.2f}s, first token {self.first_output - self.arrival:.2f}s, "
                f"total {self.last_output - self.arrival:.2f}s")


class EngineObserver(Protocol):
    """Receives timing and counts for metrics."""

    def on_admitted(self, req: GenerationRequest) -> None: ...
    def on_tokens(self, req: GenerationRequest, count: int, first: bool, now: float) -> None: ...
    def on_finished(self, req: GenerationRequest) -> None: ...
    def on_embedded(self, req: GenerationRequest) -> None: ...
    def on_queue(self, running: int, waiting: int) -> None: ...
    def on_step(self, decode_rows: int, draft_cap: int | None) -> None: ...


class QueueFullError(RuntimeError):
    pass


class EngineLoop:
    """Owns the engine thread and its continuous batcher; ``submit`` is safe to call from any thread.

    Each iteration moves waiting requests into free batch slots (first come, first served),
    drops cancelled ones, runs a packed prefill of the next prompt chunks within the token
    budget (delivering first tokens at once), then one batched speculative step of every
    running request. A request's KV cache is allocated only when it gets a slot.
    """

    def __init__(self, engine: SpeculativeEngine, batcher: ContinuousBatcher, max_queue: int,
                 observer: EngineObserver, thread: concurrent.futures.ThreadPoolExecutor) -> None:
        self.engine = engine
        self.batcher = batcher
        self.max_queue = max_queue
        self.observer = observer
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._active: dict[int, GenerationRequest] = {}  # id(seq) -> request, for sequences in the batcher
        self._in_flight = 0  # submitted and not yet finished: waiting or in the batcher
        self._calls: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._wake = threading.Condition()
        self._stop = False
        self._thread = thread
        self._running: concurrent.futures.Future | None = None

    def start(self) -> None:
        self._running = self._thread.submit(self._run)

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._running is not None:
            concurrent.futures.wait([self._running], timeout=30)
        self._thread.shutdown(wait=False)

    @property
    def alive(self) -> bool:
        return self._running is not None and not self._running.done()

    def submit(self, requests: list[GenerationRequest]) -> None:
        """Queue all ``requests`` or none (QueueFullError when the queue cannot hold them)."""
        with self._wake:
            if self._in_flight + len(requests) > self.batcher.max_batch_size + self.max_queue:
                raise QueueFullError(f"queue full ({len(self._waiting)} waiting)")
            self._in_flight += len(requests)
            self._waiting.extend(requests)
            self.observer.on_queue(len(self._active), len(self._waiting))
            self._wake.notify()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the engine thread between two steps (it owns the engine's state); its result
        or exception arrives in the returned future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if self._stop:
                raise RuntimeError("the engine loop has stopped")
            self._calls.append((fn, future))
            self._wake.notify()
        return future

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self._stop and not self._waiting and not self._active and not self._calls:
                    self._wake.wait()
                if self._stop:
                    break
                calls, self._calls = self._calls, []
                admitted = []
                while self._waiting and self.batcher.size + len(admitted) < self.batcher.max_batch_size:
                    admitted.append(self._waiting.popleft())
            for fn, future in calls:
                try:
                    future.set_result(fn())
                except Exception as exc:  # noqa: BLE001 - the caller gets it
                    future.set_exception(exc)
            for req in admitted:
                self._admit(req)
            for req in [r for r in self._active.values() if r.cancelled.is_set()]:
                self._cancel(req)
            if self.batcher.size:  # first tokens go out before the decode step, not after it
                # a request arriving mid-step cuts the drafts short: its prefill is not kept waiting
                for step in (self.batcher.prefill_step(), self.batcher.decode_step(self._has_waiting)):
                    self.observer.on_step(step.decode_rows, step.draft_cap)
                    for seq, out in step.outputs:
                        self._deliver(self._active[id(seq)], out)
            with self._wake:
                self.observer.on_queue(len(self._active), len(self._waiting))
        for req in list(self._active.values()) + list(self._waiting):
            req.emit(GenerationEvent(error=RuntimeError("server shutting down")))
        for _, future in self._calls:
            future.set_exception(RuntimeError("server shutting down"))

    def _has_waiting(self) -> bool:
        """Whether requests wait for admission or prefill (read without the lock: a hint, not a decision)."""
        return bool(self._waiting) or bool(self.batcher.prefilling)

    def _release(self, req: GenerationRequest) -> None:
        """``req`` left the engine (finished, failed or cancelled)."""
        with self._wake:
            self._in_flight -= 1
        if req.seq is not None:
            self._active.pop(id(req.seq), None)
            self.batcher.remove(req.seq)

    def _admit(self, req: GenerationRequest) -> None:
        if req.cancelled.is_set():
            self._release(req)
            return
        req.admitted = time.monotonic()
        self.observer.on_admitted(req)
        try:
            req.seq = self.engine.admit(req.prompt_ids, req.params)
        except Exception as exc:  # a bad request must never take the loop down
            log.exception("admission failed for %s", req.request_id)
            self._release(req)
            req.emit(GenerationEvent(error=exc))
            return
        self._active[id(req.seq)] = req
        self.batcher.add(req.seq)

    def _cancel(self, req: GenerationRequest) -> None:
        self._release(req)
        if req.route is not None:  # decoding had started: account for what it did
            req.seq.finish_reason = req.seq.stats.finish_reason = "abort"
            self.observer.on_finished(req)
            log.info(req.summary())

    def _deliver(self, req: GenerationRequest, out: StepOutput | BaseException) -> None:
        if isinstance(out, BaseException):
            log.error("decoding failed for %s: %r", req.request_id, out)
            self._release(req)
            req.emit(GenerationEvent(error=out))
            return
        if req.params.embed_only:  # prefilled for its embedding: nothing to route or decode
            req.last_output = req.first_output = time.monotonic()
            self._release(req)
            self.observer.on_embedded(req)
            req.emit(GenerationEvent(finish_reason=out.finish_reason, stats=req.seq.stats, embedding=req.seq.embedding))
            return
        first = req.route is None
        if first:  # prefill complete: route by the prompt embedding before the first decode step
            try:
                req.route = req.choose_policy(req.seq.embedding)
                req.seq.policy = req.route.policy
            except Exception as exc:
                log.exception("routing failed for %s", req.request_id)
                self._release(req)
                req.emit(GenerationEvent(error=exc))
                return
        now = time.monotonic()
        self.observer.on_tokens(req, len(out.token_ids), first, now)
        req.last_output = now
        req.first_output = req.first_output or now
        done = out.finish_reason is not None
        if done:
            self._release(req)
            self.observer.on_finished(req)
            log.info(req.summary())
        req.emit(GenerationEvent(text=out.text, token_ids=out.token_ids, logprobs=out.logprobs,
                                 prompt_logprobs=out.prompt_logprobs, finish_reason=out.finish_reason,
                                 sources=out.sources, route=req.route if first or done else None,
                                 stats=req.seq.stats if done else None))
