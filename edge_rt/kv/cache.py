"""KV caches: objects outside the model, one per layer.

Protocol (what attention and the engine rely on):
    update_and_fetch(k, v) -> (keys, values)   append [B, Hkv, T, hd], return all cached so far
    append_slots(T) -> (keys, values, start)   optional: reserve T positions, caller writes them
    offset                                     number of positions cached
    trim(n) -> int                             drop the last n positions (speculative rollback)
    nbytes                                     bytes held
"""

from __future__ import annotations

import torch


class KVCache:
    """Full cache: keeps every position, grows in steps of `step` up to `max_len`."""

    step = 256

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.shape = (batch, n_kv_heads, 0, head_dim)
        self.max_len = max_len
        self.dtype, self.device = dtype, torch.device(device)
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.offset = 0

    def _grow(self, needed: int) -> None:
        B, H, _, D = self.shape
        cap = 0 if self.keys is None else self.keys.shape[2]
        new_cap = min(self.max_len, ((needed + self.step - 1) // self.step) * self.step)
        k = torch.zeros(B, H, new_cap, D, dtype=self.dtype, device=self.device)
        v = torch.zeros_like(k)
        if cap:
            k[:, :, : self.offset] = self.keys[:, :, : self.offset]
            v[:, :, : self.offset] = self.values[:, :, : self.offset]
        self.keys, self.values = k, v

    def append_slots(self, T: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Make room for T positions and count them as cached: (keys, values, start), the whole
        [B, Hkv, capacity, hd] buffers and the first new position, for a caller that writes the
        new entries itself (the native decode attention)."""
        start, end = self.offset, self.offset + T
        if end > self.max_len:
            raise IndexError(f"KV cache full: {end} positions > max_len {self.max_len}")
        if self.keys is None or end > self.keys.shape[2]:
            self._grow(end)
        self.offset = end
        return self.keys, self.values, start

    def update_and_fetch(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: [B, Hkv, T, hd]
        keys, values, start = self.append_slots(k.shape[2])
        end = self.offset
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def trim(self, n: int) -> int:
        n = max(0, min(self.offset, n))
        self.offset -= n
        return n

    def reset(self) -> None:
        self.offset = 0

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return 2 * self.keys.numel() * self.keys.element_size()



def make_caches(num_layers: int, n_kv_heads: int, head_dim: int, max_len: int,
                dtype: torch.dtype, device, batch: int = 1) -> list[KVCache]:
    return [KVCache(batch, n_kv_heads, head_dim, max_len, dtype, device) for _ in range(num_layers)]
