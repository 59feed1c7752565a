"""Every replica's ``knn_ssd_*`` series on the ingress's ``/metrics``, each sample labelled with its replica.

Each replica serves its own registry over HTTP on a free port of its node and lists itself in a
``ReplicaDirectory`` actor; a scrape of the ingress reads every listed replica at once and merges the
families, so one Prometheus target sees the whole application (Ray Serve labels its own series the same
way: ``replica``). A replica that stops answering (killed, scaled down) is dropped from the directory.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import httpx
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("knn_ssd.scaleout")

SCRAPE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class ReplicaEntry:
    """Where one replica's metrics are, and which process serves it (for operators and fault tests)."""

    replica: str
    metrics_url: str
    pid: int
    node: str


class ReplicaDirectory:
    """The live replicas of one application (a named Ray actor: replicas add themselves, the ingress reads)."""

    def __init__(self) -> None:
        self._entries: dict[str, ReplicaEntry] = {}

    def add(self, entry: ReplicaEntry) -> None:
        self._entries[entry.replica] = entry

    def remove(self, replica: str) -> None:
        self._entries.pop(replica, None)

    def entries(self) -> list[ReplicaEntry]:
        return sorted(self._entries.values(), key=lambda e: e.replica)


def serve_registry(registry: CollectorRegistry, host: str) -> str:
    """Serve ``registry`` on a free port of ``host`` (a thread of this process); its URL."""
    server, _ = start_http_server(0, addr="0.0.0.0", registry=registry)
    return f"http://{host}:{server.server_port}/metrics"


async def scrape(entries: list[ReplicaEntry]) -> tuple[dict[str, str], list[ReplicaEntry]]:
    """Every replica's exposition text by replica id, and the entries that did not answer."""
    async with httpx.AsyncClient(timeout=SCRAPE_TIMEOUT_S) as client:
        replies = await asyncio.gather(*(client.get(e.metrics_url) for e in entries), return_exceptions=True)
    texts, silent = {}, []
    for entry, reply in zip(entries, replies):
        if isinstance(reply, httpx.Response) and reply.status_code == 200:
            texts[entry.replica] = reply.text
        else:
            log.warning("replica %s did not answer its metrics scrape (%s): dropped from the directory",
                        entry.replica, reply if isinstance(reply, Exception) else reply.status_code)
            silent.append(entry)
    return texts, silent


class _Merged:
    """A collector yielding pre-built families (``generate_latest`` writes them in the text format)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def merge(texts: dict[str, str]) -> bytes:
    """One exposition of every replica's families, each sample with a ``replica`` label."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                merged.samples.append(sample._replace(labels={"replica": replica, **sample.labels}))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(list(families.values())))
    return generate_latest(registry)
