"""Prometheus metrics (prefix ``knn_ssd_``), fed by the engine loop and the HTTP layer."""

from __future__ import annotations

import threading
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from decoding.policy import MAX_DRAFT_LIMIT
from decoding.prefix_cache import PrefixCache

from .engine_loop import GenerationRequest, RouteDecision

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CAP_BUCKETS = (0, 1, 2, 4, 8, 12, 16)
ROUTER_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05)
PLAIN_DOMAIN = "plain"

# No `_created` sample beside every counter and histogram (a timestamp series per label set that no
# dashboard reads; vLLM drops them too). prometheus_client's switch is process-wide.
disable_created_metrics()


class Metrics:
    """All server metrics in one registry; ``model`` is fixed per server."""

    def __init__(self, model: str, registry: CollectorRegistry | None = None) -> None:
        self.model = model
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("knn_ssd_requests", "Finished API requests by HTTP status and finish reason",
                                ["model", "status", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("knn_ssd_prompt_tokens", "Prompt tokens of admitted requests (prefilled or "
                                     "read from the prefix cache)", ["model"], registry=r)
        self.prefix_cache_hits = Counter("knn_ssd_prefix_cache_hit_tokens", "Prompt tokens whose KV entries came "
                                         "from the prefix cache instead of prefill", ["model"], registry=r)
        self.prefix_cache_bytes = Gauge("knn_ssd_prefix_cache_bytes", "Memory held by the prefix cache",
                                        ["model"], registry=r)
        self.generation_tokens = Counter("knn_ssd_generation_tokens", "Generated tokens", ["model", "domain"],
                                         registry=r)
        self.draft_tokens = Counter("knn_ssd_draft_tokens", "Tokens proposed by the draft", ["model", "domain"],
                                    registry=r)
        self.accepted_tokens = Counter("knn_ssd_accepted_tokens", "Draft tokens accepted by verification",
                                       ["model", "domain"], registry=r)
        self.verify_steps = Counter("knn_ssd_verify_steps", "Full-model decode forwards (verify or plain steps)",
                                    ["model", "domain"], registry=r)
        self.routing = Counter("knn_ssd_routing_decisions", "Requests per chosen domain policy",
                               ["model", "domain"], registry=r)
        self.router_latency = Histogram("knn_ssd_router_lookup_seconds", "KNN router lookup latency", ["model"],
                                        buckets=ROUTER_BUCKETS, registry=r)
        self.ttft = Histogram("knn_ssd_time_to_first_token_seconds", "Arrival to first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("knn_ssd_inter_token_latency_seconds", "Time between consecutive tokens", ["model"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("knn_ssd_e2e_request_latency_seconds", "Arrival to last token", ["model"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("knn_ssd_queue_time_seconds", "Arrival to admission", ["model"],
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.embedding_requests = Counter("knn_ssd_embedding_requests", "Inputs embedded (/v1/embeddings: one per "
                                          "string or token list)", ["model"], registry=r)
        self.embedding_tokens = Counter("knn_ssd_embedding_tokens", "Tokens of embedded inputs (prefilled or read "
                                        "from the prefix cache)", ["model"], registry=r)
        self.running = Gauge("knn_ssd_requests_running", "Sequences being decoded", ["model"], registry=r)
        self.waiting = Gauge("knn_ssd_requests_waiting", "Sequences waiting for admission", ["model"], registry=r)
        self.batch_size = Histogram("knn_ssd_batch_size", "Sequences advanced together per batched decode step",
                                    ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.draft_cap = Histogram("knn_ssd_draft_length_cap", "Draft length cap chosen per batched decode step by "
                                   f"load-adaptive speculation ({MAX_DRAFT_LIMIT}: uncapped, each policy's own)",
                                   ["model"], buckets=CAP_BUCKETS, registry=r)
        self.speedup = Gauge("knn_ssd_speedup", "Decode tokens/s with the domain's policy over plain decoding "
                             "tokens/s, both measured by this server", ["model", "domain"], registry=r)
        self.decode_rate = Gauge("knn_ssd_decode_tokens_per_second", "Mean per-request decode tokens/s",
                                 ["model", "domain"], registry=r)
        self.index_reloads = Counter("knn_ssd_index_reloads", "Routing index reloads on SIGHUP, by result (ok: the "
                                     "new index serves; failed: the running one stayed)", ["model", "result"],
                                     registry=r)
        for result in ("ok", "failed"):
            self.index_reloads.labels(model, result)
        self._rates: dict[str, list[float]] = {}  # domain -> [tokens, seconds]
        self._lock = threading.Lock()
        for metric in (self.prompt_tokens, self.prefix_cache_hits, self.prefix_cache_bytes, self.batch_size,
                       self.draft_cap, self.router_latency, self.ttft, self.itl, self.e2e, self.queue_time,
                       self.running, self.waiting, self.embedding_requests, self.embedding_tokens):
            metric.labels(model)
        self.declare_domains([PLAIN_DOMAIN])

    def declare_domains(self, domains: Iterable[str]) -> None:
        """Create the per-domain counters at zero, so dashboards show 0 (not "no data") before traffic."""
        for domain in domains:
            for counter in (self.generation_tokens, self.draft_tokens, self.accepted_tokens, self.verify_steps,
                            self.routing):
                counter.labels(self.model, domain)

    def track_prefix_cache(self, cache: PrefixCache) -> None:
        """Report ``cache``'s memory at every scrape."""
        self.prefix_cache_bytes.labels(self.model).set_function(lambda: cache.nbytes)

    # ------------------------------------------------------------------ EngineObserver
    def on_admitted(self, req: GenerationRequest) -> None:
        self.queue_time.labels(self.model).observe(req.admitted - req.arrival)
        self.prompt_tokens.labels(self.model).inc(len(req.prompt_ids))

    def on_tokens(self, req: GenerationRequest, count: int, first: bool, now: float) -> None:
        if first:
            self.ttft.labels(self.model).observe(now - req.arrival)
            route = req.route
            self.routing.labels(self.model, domain_label(route)).inc()
            self.prefix_cache_hits.labels(self.model).inc(req.seq.stats.cached_tokens)
            if route.router_ms:
                self.router_latency.labels(self.model).observe(route.router_ms / 1000)
        elif count:
            gap = (now - req.last_output) / count
            for _ in range(count):
                self.itl.labels(self.model).observe(gap)

    def on_finished(self, req: GenerationRequest) -> None:
        stats, route = req.seq.stats, req.route
        domain = domain_label(route)
        self.generation_tokens.labels(self.model, domain).inc(stats.completion_tokens)
        self.draft_tokens.labels(self.model, domain).inc(stats.draft_tokens)
        self.accepted_tokens.labels(self.model, domain).inc(stats.accepted_tokens)
        self.verify_steps.labels(self.model, domain).inc(stats.verify_steps)
        self.e2e.labels(self.model).observe(req.last_output - req.arrival)
        if stats.decode_s > 0 and stats.verify_steps:
            self.record_rate(PLAIN_DOMAIN if route.policy.is_plain else domain, stats.step_tokens, stats.decode_s)

    def on_embedded(self, req: GenerationRequest) -> None:
        self.embedding_requests.labels(self.model).inc()
        self.embedding_tokens.labels(self.model).inc(len(req.prompt_ids))
        self.prefix_cache_hits.labels(self.model).inc(req.seq.stats.cached_tokens)
        self.e2e.labels(self.model).observe(req.last_output - req.arrival)

    def on_step(self, decode_rows: int, draft_cap: int | None) -> None:
        if decode_rows:
            self.batch_size.labels(self.model).observe(decode_rows)
            self.draft_cap.labels(self.model).observe(MAX_DRAFT_LIMIT if draft_cap is None else draft_cap)

    def on_queue(self, running: int, waiting: int) -> None:
        self.running.labels(self.model).set(running)
        self.waiting.labels(self.model).set(waiting)

    # ------------------------------------------------------------------ speedup
    def record_rate(self, domain: str, tokens: float, seconds: float) -> None:
        """Add decode work of ``domain`` and refresh its speedup over plain decoding."""
        with self._lock:
            acc = self._rates.setdefault(domain, [0.0, 0.0])
            acc[0] += tokens
            acc[1] += seconds
            rates = {d: t / s for d, (t, s) in self._rates.items() if s > 0}
        for d, rate in rates.items():
            self.decode_rate.labels(self.model, d).set(rate)
        plain = rates.get(PLAIN_DOMAIN)
        if plain:
            for d, rate in rates.items():
                self.speedup.labels(self.model, d).set(rate / plain)

    def request_done(self, status: int, finish_reason: str | None) -> None:
        self.requests.labels(self.model, str(status), finish_reason or "none").inc()


def domain_label(route: RouteDecision) -> str:
    """Metric label of a request: its routed domain, else "plain" or "custom" (explicit skip_layers)."""
    if route.domain:
        return route.domain
    return PLAIN_DOMAIN if route.policy.is_plain else "custom"
