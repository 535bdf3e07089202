"""Key/value caches for sampling one position at a time; each layer's attention calls
`cache.attend(q, k, v)` and gets the attention output back.

KVCache grows: attention reads the keys written so far, a shape that changes every step (the
default path). StaticKVCache keeps one shape: attention reads the whole preallocated cache under
a mask of the positions written so far, and the position to write is a device tensor, not a
Python int. One step is then the same kernels on the same memory every time, which is what a
CUDA graph can record once and replay (model/sampling_steps.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class KVCache:
    """Keys and values of one attention layer, preallocated for `capacity` positions."""

    def __init__(self, batch: int, heads: int, capacity: int, head_dim: int, like: Tensor):
        # never read past `length`: no need to zero (a new depth cache every spatial step)
        self.k = like.new_empty(batch, heads, capacity, head_dim)
        self.v = like.new_empty(batch, heads, capacity, head_dim)
        self.length = 0

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q, k, v (B, heads, n, head_dim) of n new positions -> (B, heads, n, head_dim): a
        prefix (n > 1) into an empty cache, then one position at a time."""
        n = k.shape[2]
        if n != 1 and self.length:
            raise ValueError("cached attention takes a prefix, then one position at a time")
        end = self.length + n
        self.k[:, :, self.length : end], self.v[:, :, self.length : end] = k, v
        self.length = end
        # the new positions attend to themselves and all before (causal within a prefix)
        return F.scaled_dot_product_attention(
            q, self.k[:, :, :end], self.v[:, :, :end], is_causal=n > 1
        )


class StaticKVCache:
    """Keys and values of one layer, always read whole: positions after `position` are masked.

    `position` (1,) long is shared by the layers of a stack (StaticCaches) and moved by the
    sampler between steps; the cache never needs resetting, since a later step overwrites a
    position before it is unmasked again.
    """

    def __init__(self, batch: int, heads: int, capacity: int, head_dim: int, like: Tensor,
                 position: Tensor) -> None:  # fmt: skip
        # zeros, not empty: a masked key or value still enters the fused kernels' arithmetic,
        # and 0 * NaN of uninitialised memory would be NaN
        self.k = like.new_zeros(batch, heads, capacity, head_dim)
        self.v = like.new_zeros(batch, heads, capacity, head_dim)
        self.position = position
        self.key_positions = torch.arange(capacity, device=like.device)  # (capacity,)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q, k, v (B, heads, 1, head_dim) of the position `position` -> (B, heads, 1,
        head_dim)."""
        if k.shape[2] != 1:
            raise ValueError("a static cache takes one position at a time")
        self.k.index_copy_(2, self.position, k)
        self.v.index_copy_(2, self.position, v)
        visible = (self.key_positions <= self.position).view(1, 1, 1, -1)  # (1, 1, 1, capacity)
        return F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=visible)


class StaticCaches(list):
    """One StaticKVCache per layer of a stack, all writing at the shared `position`."""

    def __init__(self, layers: int, batch: int, heads: int, capacity: int, head_dim: int,
                 like: Tensor) -> None:  # fmt: skip
        self.position = torch.zeros(1, dtype=torch.long, device=like.device)
        super().__init__(
            StaticKVCache(batch, heads, capacity, head_dim, like, self.position)
            for _ in range(layers)
        )
