"""Static key/value cache for decoding: preallocated buffers, one pair per layer."""
from __future__ import annotations

import torch


class KVCache:
    """Keys/values of every layer, (B, n_kv_heads, max_len, head_dim) each, filled left to right.

    `length` counts the positions written so far (the same for every row; left padding is expressed
    by `key_valid` (B, max_len), False at padded slots). Layers call `update`; the model calls
    `advance` once per forward, after the last layer.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.key_valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.max_len = max_len
        self.has_padding = False  # host-side: True once a padded row was written (no device sync to ask)

    @classmethod
    def for_model(cls, config, batch_size: int, max_len: int, dtype=torch.float32, device="cpu") -> "KVCache":
        return cls(config.n_layers, batch_size, config.n_kv_heads, config.head_dim, max_len, dtype, device)

    @property
    def batch_size(self) -> int:
        return self.key_valid.shape[0]

    def check_room(self, n_new: int) -> None:
        if self.length + n_new > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.length} used, "
                             f"{n_new} more requested (prompt + new tokens exceed the cache/context length)")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, n_kv, T, D) at the current position; return all keys/values so far."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def repeat_interleave(self, n: int) -> "KVCache":
        """A new cache whose every row is repeated n times (share one prompt's cache across n samples)."""
        out = object.__new__(KVCache)
        out.keys = [k.repeat_interleave(n, dim=0) for k in self.keys]
        out.values = [v.repeat_interleave(n, dim=0) for v in self.values]
        out.key_valid = self.key_valid.repeat_interleave(n, dim=0)
        out.length, out.max_len, out.has_padding = self.length, self.max_len, self.has_padding
        return out
