"""Preallocated key/value cache with O(1) rollback, for speculative decoding.

Speculative decoding appends k+1 tokens per verify pass and then rejects a suffix; rolling back
must be free. So the cache owns one fixed [B, kv_heads, max_len, head_dim] buffer per layer and a
single valid `length`. Layers write at [length, length + T) and read views of [0, length + T);
the decoder calls `advance(T)` once after all layers, so every layer of one forward sees the
same `length`. `crop(n)` just moves `length` back; stale entries past it are overwritten later.
All sequences in the batch share one length (no padding support).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .config import DecoderConfig


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_config(
        cls,
        cfg: DecoderConfig,
        batch_size: int = 1,
        max_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> "KVCache":
        return cls(cfg.num_layers, batch_size, cfg.num_kv_heads, max_len or cfg.max_positions,
                   cfg.head_dim, dtype, device)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, kv_heads, T, head_dim] after the valid prefix; return views of all.

        Does not advance `length`: call `advance(T)` once the whole forward pass is done.
        """
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} > {self.max_len}")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def get(self, layer: int) -> tuple[Tensor, Tensor]:
        """Views of the valid prefix [0, length) of one layer (read by the action expert)."""
        return self.keys[layer][:, :, :self.length], self.values[layer][:, :, :self.length]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def crop(self, length: int) -> None:
        """Roll back to `length` valid tokens (reject a draft suffix). No copy."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop to {length} (valid length {self.length})")
        self.length = length

    def reset(self) -> None:
        self.length = 0
