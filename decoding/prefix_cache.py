"""Automatic prefix caching: prompt KV entries reused by later prompts that start the same way.

Prompts are cut into blocks of ``block_tokens`` tokens; a block is identified by its own
tokens and everything before it (a hash chain), so one lookup walks a new prompt's blocks
from the start until the first unknown one. Each block keeps the full model's key/value
entries of its positions and the float64 sum of their final hidden states, so a prompt
that starts with cached blocks skips their prefill and still gets its exact mean-pooled
embedding for routing.

Only prefill-computed entries are cached: with the native CPU kernels prefill is
batch-invariant (a position's entries do not depend on the chunk or batch that computed them),
so reusing them gives exactly the output of a fresh prefill (elsewhere, as close as chunked
prefill is). Entries written by decode steps come from other kernels and are
never cached. Memory is bounded by ``capacity_bytes``; the least recently used blocks go
first, and a block is always more recently used than its descendants, so eviction never
strands a reachable block's children before the block itself.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from .kv_cache import KVCache

BLOCK_TOKENS = 16  # tokens per block: the granularity of prefix matches and of embedding sums

@dataclass(frozen=True)
class CachedBlock:
    """One block: its tokens, the key of the block before it, and what prefill computed for it."""

    tokens: tuple[int, ...]
    parent: int | None
    keys: torch.Tensor  # (layers, kv_heads, block_tokens, head_dim)
    values: torch.Tensor
    hidden_sum: torch.Tensor  # (hidden,) float64: sum of the final-norm hidden states of its positions

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.hidden_sum))


class PrefixCache:
    """Least-recently-used store of prompt blocks, at most ``capacity_bytes`` of tensors."""

    def __init__(self, capacity_bytes: int, block_tokens: int = BLOCK_TOKENS) -> None:
        if capacity_bytes < 0 or block_tokens < 1:
            raise ValueError("capacity_bytes must be >= 0 and block_tokens >= 1")
        self.capacity_bytes = capacity_bytes
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[int, CachedBlock] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def _chain(self, tokens: list[int], blocks: int) -> list[tuple[int, tuple[int, ...]]]:
        """(key, tokens) of the first ``blocks`` blocks of ``tokens``."""
        chain, parent, b = [], None, self.block_tokens
        for i in range(blocks):
            part = tuple(tokens[i * b:(i + 1) * b])
            parent = hash((parent, part))
            chain.append((parent, part))
        return chain

    def match(self, tokens: list[int], limit: int) -> list[CachedBlock]:
        """The cached blocks that start ``tokens``, covering at most ``limit`` tokens (longest first match)."""
        found, keys, parent = [], [], None
        for key, part in self._chain(tokens, max(0, limit) // self.block_tokens):
            block = self._blocks.get(key)
            if block is None or block.tokens != part or block.parent != parent:
                break
            found.append(block)
            keys.append(key)
            parent = key
        self._touch(keys)
        return found

    def insert(self, tokens: list[int], cache: KVCache, hidden_sums: list[torch.Tensor]) -> int:
        """Store the complete blocks of a prefilled prompt (``tokens``, entries in ``cache``, per-block
        hidden sums); returns how many blocks were new."""
        b = self.block_tokens
        count = min(len(tokens), cache.length) // b
        chain = self._chain(tokens, min(count, len(hidden_sums)))
        added, parent = 0, None
        for i, (key, part) in enumerate(chain):
            if key not in self._blocks:
                block = CachedBlock(part, parent, cache.keys[:, 0, :, i * b:(i + 1) * b].clone(),
                                    cache.values[:, 0, :, i * b:(i + 1) * b].clone(), hidden_sums[i].clone())
                if block.nbytes > self.capacity_bytes:
                    break
                self._blocks[key] = block
                self.nbytes += block.nbytes
                added += 1
            parent = key
        self._touch([key for key, _ in chain])
        self._evict()
        return added

    def clear(self) -> None:
        """Drop every block."""
        self._blocks.clear()
        self.nbytes = 0

    def _touch(self, keys: list[int]) -> None:
        """Mark a chain used, its deepest block first, so that parents stay more recent than children."""
        for key in reversed(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)

    def _evict(self) -> None:
        while self.nbytes > self.capacity_bytes and self._blocks:
            _, block = self._blocks.popitem(last=False)
            self.nbytes -= block.nbytes
