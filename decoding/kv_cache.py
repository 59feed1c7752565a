"""Position-indexed KV buffer: writes go to absolute positions, so "cropping" is just a length."""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer key/value buffers of one sequence.

    Positions ``[0, length)`` hold full-model entries for committed tokens.
    Anything beyond ``length`` (draft or rejected entries) is stale and is never
    read: every forward writes the positions it computes before attending, and
    attends only up to its own position.
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_layers, 1, kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self._layer_views = [(self.keys[i, 0], self.values[i, 0]) for i in range(num_layers)]
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` (B, H, T, D) at ``start`` and return the keys/values of positions ``[0, start + T)``."""
        end = start + k.shape[2]
        self._check(end)
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def layer_buffers(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole (H, capacity, D) key/value buffers of ``layer`` of the first sequence, for a kernel
        that writes positions below ``end`` itself."""
        self._check(end)
        return self._layer_views[layer]

    def _check(self, end: int) -> None:
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: position {end} > capacity {self.capacity}")

    def commit(self, length: int) -> None:
        """Mark ``[0, length)`` as holding committed full-model entries."""
        if not 0 <= length <= self.capacity:
            raise ValueError(f"invalid committed length {length}")
        self.length = length
