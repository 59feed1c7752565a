"""Prefix-affinity replica choice, plugged into Ray Serve's request-router API.

A request whose prompt starts like earlier requests' goes to the replicas that served them, while one of
them has room (fewer ongoing requests than ``max_ongoing_requests``): their prefix cache holds the shared
prefix, so it is not prefilled again. Otherwise, and when those replicas are full, the least loaded replica
takes it (Ray Serve probes queue lengths and picks the shortest among a rank's replicas with room).

Prompts are compared in blocks of ``block_chars`` characters, each block's key chained from the blocks
before it (so a key names a whole prefix, as the replicas' prefix cache does with 16-token blocks).
"""

from __future__ import annotations

import collections
import hashlib
import json
import random
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

BLOCK_CHARS = 128  # ~32 tokens: a shorter shared prefix saves too little prefill to be worth a less even spread
MAX_PREFIXES = 100_000  # block keys remembered (least recently used dropped): ~10 MB


def prefix_keys(text: str, block_chars: int = BLOCK_CHARS) -> list[bytes]:
    """The chained key of every whole ``block_chars`` block of ``text`` (key i names blocks 0..i)."""
    keys, key = [], b""
    for start in range(0, len(text) - block_chars + 1, block_chars):
        key = hashlib.blake2b(key + text[start:start + block_chars].encode(), digest_size=12).digest()
        keys.append(key)
    return keys


def prompt_text(body: bytes) -> str | None:
    """The text a JSON request body starts generation from: chat ``messages`` (roles and contents), a
    completion ``prompt``, or an embeddings/Responses ``input``; None for other bodies."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("messages"), list):
        return "".join(f"{m.get('role', '')}:{_text(m.get('content'))}\n" for m in data["messages"]
                       if isinstance(m, dict))
    for field in ("prompt", "input"):
        if field in data:
            return _text(data[field])
    return None


def _text(value: Any) -> str:
    """Text of a content value: a string, a list of parts (``{"text": ...}``), or anything else as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        return "".join(str(p.get("text", "")) for p in value)
    return json.dumps(value)


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """Ranks first the replicas that served the longest prefix of a request's prompt, then every replica."""

    def initialize_state(self, block_chars: int = BLOCK_CHARS, max_prefixes: int = MAX_PREFIXES) -> None:
        self.block_chars = block_chars
        self.max_prefixes = max_prefixes
        # prefix key -> replicas that served a prompt with that prefix, most recent last
        self.holders: collections.OrderedDict[bytes, dict[ReplicaID, None]] = collections.OrderedDict()

    def _keys(self, pending_request: PendingRequest | None) -> list[bytes]:
        if pending_request is None or not pending_request.args:
            return []
        text = getattr(pending_request.args[0], "prompt", None)
        return prefix_keys(text, self.block_chars) if text else []

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        everyone = random.sample(candidate_replicas, len(candidate_replicas))  # equal loads: no favourite
        by_id = {r.replica_id: r for r in candidate_replicas}
        for key in reversed(self._keys(pending_request)):  # the longest prefix first
            holders = [by_id[h] for h in self.holders.get(key, ()) if h in by_id]
            if holders:
                self.holders.move_to_end(key)
                return [holders, everyone]
        return [everyone]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        for key in self._keys(pending_request):
            holders = self.holders.setdefault(key, {})
            holders.pop(replica_id, None)
            holders[replica_id] = None
            self.holders.move_to_end(key)
        while len(self.holders) > self.max_prefixes:
            self.holders.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for holders in self.holders.values():
            holders.pop(replica_id, None)
