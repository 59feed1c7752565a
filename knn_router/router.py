"""Route a prompt embedding to a calibrated domain policy by K-nearest-neighbour lookup (hnswlib, cosine)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, replace

import hnswlib
import numpy as np

from decoding.policy import LOOKUP_ONLY, PLAIN, DraftPolicy

MIXED = "mixed"


@dataclass(frozen=True)
class RouteResult:
    """The routing decision for one prompt."""

    label: str
    policy: DraftPolicy
    similarity: float
    lookup_ms: float
    fallback: bool  # True when no anchor was similar enough and the mixed policy was used


class Router:
    """Anchors (prompt-embedding centres labelled by domain) and one decoding policy per label.

    Thread-safe: lookups and ``add_items`` may run from any thread.
    """

    def __init__(self, anchors: np.ndarray, labels: list[str], policies: dict[str, DraftPolicy], k: int = 1,
                 threshold: float = 0.0, index: hnswlib.Index | None = None) -> None:
        anchors = np.asarray(anchors, dtype=np.float32)
        if anchors.ndim != 2 or len(anchors) != len(labels) or not len(labels):
            raise ValueError("anchors must be a non-empty (n, dim) array with one label per row")
        missing = sorted(set(labels) - set(policies))
        if missing:
            raise ValueError(f"no policy for labels {missing}")
        if MIXED not in policies:
            raise ValueError(f"a '{MIXED}' fallback policy is required")
        if k < 1:
            raise ValueError("k must be >= 1")
        self.dim = anchors.shape[1]
        self.labels = list(labels)
        self.policies = dict(policies)
        self.k = k
        self.threshold = threshold
        self._lock = threading.Lock()
        if index is None:
            index = hnswlib.Index(space="cosine", dim=self.dim)
            index.init_index(max_elements=max(len(labels), 16), ef_construction=200, M=16)
            index.add_items(anchors, np.arange(len(labels)))
        index.set_ef(max(32, 4 * k))
        index.set_num_threads(1)  # single queries: thread hand-off costs more than it saves
        self.index = index

    @property
    def domains(self) -> list[str]:
        return sorted(set(self.labels))

    def __len__(self) -> int:
        return len(self.labels)

    def policy_for(self, domain: str) -> DraftPolicy:
        """The calibrated policy of ``domain`` (KeyError if unknown)."""
        return self.policies[domain]

    def route(self, embedding: np.ndarray) -> RouteResult:
        """Label and policy for ``embedding``: similarity-weighted vote of the K nearest anchors."""
        start = time.perf_counter()
        query = np.asarray(embedding, dtype=np.float32).reshape(1, -1)
        with self._lock:
            k = min(self.k, len(self.labels))
            ids, distances = self.index.knn_query(query, k=k)
        if k == 1:
            label, similarity = self.labels[ids[0, 0]], 1.0 - float(distances[0, 0])
        else:
            label, similarity = self._vote(ids[0], distances[0])
        fallback = similarity < self.threshold
        if fallback:
            label = MIXED
        elapsed = (time.perf_counter() - start) * 1000
        return RouteResult(label, self.policies[label], similarity, elapsed, fallback)

    def _vote(self, ids: np.ndarray, distances: np.ndarray) -> tuple[str, float]:
        """Label with the largest summed similarity among the neighbours, and its best similarity."""
        votes: dict[str, float] = defaultdict(float)
        best: dict[str, float] = {}
        for i, d in zip(ids, distances):
            label, sim = self.labels[i], 1.0 - float(d)
            votes[label] += sim
            best[label] = max(best.get(label, -1.0), sim)
        label = max(votes, key=votes.get)
        return label, best[label]

    def restrict_precisions(self, precisions: tuple[str, ...]) -> dict[str, DraftPolicy]:
        """Make every policy runnable by a runner that serves the draft ``precisions``: a policy whose
        quantised copy that runner lacks (an int4 policy calibrated on CPU, served on CUDA, where only
        the CPU kernels run int4, or on a native target, which makes no copy) drafts on another quantised
        copy it has; else it keeps only its n-gram lookup drafts where it has them, or decodes plainly.
        Returns the replaced policies by domain, as they were."""
        quantised = [p for p in precisions if p != "full"]
        replaced = {}
        for domain, policy in self.policies.items():
            if not policy.is_plain and policy.precision not in precisions:
                self.policies[domain] = (replace(policy, precision=quantised[0]) if quantised else
                                         LOOKUP_ONLY if policy.lookup else PLAIN)
                replaced[domain] = policy
        return replaced

    def add_items(self, vectors: np.ndarray, labels: list[str]) -> None:
        """Add anchors at run time (labels must have a policy)."""
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        if len(vectors) != len(labels):
            raise ValueError("one label per vector is required")
        unknown = sorted(set(labels) - set(self.policies))
        if unknown:
            raise ValueError(f"no policy for labels {unknown}")
        with self._lock:
            start = len(self.labels)
            needed = start + len(labels)
            if needed > self.index.get_max_elements():
                self.index.resize_index(max(needed, 2 * self.index.get_max_elements()))
            self.index.add_items(vectors, np.arange(start, needed))
            self.labels.extend(labels)
