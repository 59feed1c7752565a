"""The engine loop: one thread owns the model and advances every admitted request step by step.

``Scheduler`` is the seam batched decoding fills in later: it decides which
sequences run each iteration. ``InterleavingScheduler`` runs one speculative
step of every running sequence in turn (batch size 1), so no request waits for
another to finish.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from decoding import DraftPolicy, RequestStats, SamplingParams, Sequence, SpeculativeEngine

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
    finish_reason: str | None = None
    route: RouteDecision | None = None
    stats: RequestStats | None = None
    error: BaseException | None = None


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
    last_output: float = 0.0


class EngineObserver(Protocol):
    """Receives timing and counts for metrics."""

    def on_admitted(self, req: GenerationRequest) -> None: ...
    def on_tokens(self, req: GenerationRequest, count: int, first: bool, now: float) -> None: ...
    def on_finished(self, req: GenerationRequest) -> None: ...
    def on_queue(self, running: int, waiting: int) -> None: ...


class QueueFullError(RuntimeError):
    pass


class Scheduler(Protocol):
    max_running: int

    def admit(self, waiting: collections.deque, running: list[GenerationRequest]) -> list[GenerationRequest]: ...
    def schedule(self, running: list[GenerationRequest]) -> list[GenerationRequest]: ...


class InterleavingScheduler:
    """First come, first served admission; one step per running sequence per iteration."""

    def __init__(self, max_running: int) -> None:
        self.max_running = max_running

    def admit(self, waiting: collections.deque, running: list[GenerationRequest]) -> list[GenerationRequest]:
        admitted = []
        while waiting and len(running) + len(admitted) < self.max_running:
            admitted.append(waiting.popleft())
        return admitted

    def schedule(self, running: list[GenerationRequest]) -> list[GenerationRequest]:
        return list(running)


class EngineLoop:
    """Owns the engine thread; ``submit`` is safe to call from any thread."""

    def __init__(self, engine: SpeculativeEngine, scheduler: Scheduler, max_queue: int,
                 observer: EngineObserver) -> None:
        self.engine = engine
        self.scheduler = scheduler
        self.max_queue = max_queue
        self.observer = observer
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._running: list[GenerationRequest] = []
        self._in_flight = 0  # submitted and not yet finished: waiting, prefilling or running
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="knn-ssd-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, requests: list[GenerationRequest]) -> None:
        """Queue all ``requests`` or none (QueueFullError when the queue cannot hold them)."""
        with self._wake:
            if self._in_flight + len(requests) > self.scheduler.max_running + self.max_queue:
                raise QueueFullError(f"queue full ({len(self._waiting)} waiting)")
            self._in_flight += len(requests)
            self._waiting.extend(requests)
            self.observer.on_queue(len(self._running), len(self._waiting))
            self._wake.notify()

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self._stop and not self._waiting and not self._running:
                    self._wake.wait()
                if self._stop:
                    break
                admitted = self.scheduler.admit(self._waiting, self._running)
            for req in admitted:
                self._prefill(req)
            for req in self.scheduler.schedule(self._running):
                self._step(req)
            with self._wake:
                self.observer.on_queue(len(self._running), len(self._waiting))
        for req in list(self._running) + list(self._waiting):
            req.emit(GenerationEvent(error=RuntimeError("server shutting down")))

    def _release(self, req: GenerationRequest) -> None:
        """``req`` left the engine (finished, failed or cancelled)."""
        with self._wake:
            self._in_flight -= 1
        if req in self._running:
            self._running.remove(req)

    def _prefill(self, req: GenerationRequest) -> None:
        if req.cancelled.is_set():
            self._release(req)
            return
        req.admitted = time.monotonic()
        self.observer.on_admitted(req)
        try:
            seq, out = self.engine.start(req.prompt_ids, req.params)
            req.route = req.choose_policy(seq.embedding)
            seq.policy = req.route.policy
            req.seq = seq
        except Exception as exc:  # a bad request must never take the loop down
            log.exception("prefill failed for %s", req.request_id)
            self._release(req)
            req.emit(GenerationEvent(error=exc))
            return
        self._running.append(req)
        self._deliver(req, out.token_ids, out.text, out.finish_reason, first=True)

    def _step(self, req: GenerationRequest) -> None:
        if req.cancelled.is_set():
            self._release(req)
            req.seq.finish_reason = req.seq.stats.finish_reason = "abort"
            self.observer.on_finished(req)
            return
        try:
            out = self.engine.step(req.seq)
        except Exception as exc:
            log.exception("decoding step failed for %s", req.request_id)
            self._release(req)
            req.emit(GenerationEvent(error=exc))
            return
        self._deliver(req, out.token_ids, out.text, out.finish_reason, first=False)

    def _deliver(self, req: GenerationRequest, token_ids: list[int], text: str, finish_reason: str | None,
                 first: bool) -> None:
        now = time.monotonic()
        self.observer.on_tokens(req, len(token_ids), first, now)
        req.last_output = now
        done = finish_reason is not None
        if done:
            self._release(req)
            self.observer.on_finished(req)
        req.emit(GenerationEvent(text=text, token_ids=token_ids, finish_reason=finish_reason,
                                 route=req.route if first or done else None,
                                 stats=req.seq.stats if done else None))
