"""Rotary position embeddings (RoPE, non-interleaved halves) applied to packed qkv."""

from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    """Caches cos/sin tables for head dimension `dim`. `inv_freq` is a persistent buffer (checkpoint key)."""

    def __init__(self, dim: int, base: float = 10_000):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)
        self._cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [seq_len, dim] in float32."""
        if self._cache is None or self._cache[0] < seq_len or self._cache[1] != device:
            t = torch.arange(seq_len, device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device=device, dtype=torch.float32))
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cache = (seq_len, device, emb.cos(), emb.sin())
        return self._cache[2][:seq_len], self._cache[3][:seq_len]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate q and k: `qk` [..., L, 2, H, D] with `cos`/`sin` [L, D], or packed tokens [T, 2, H, D] with the
    rows of their positions [T, D]. Values keep no rotation (applied to q, k only)."""
    cos = cos[:, None, None, :].to(qk.dtype)
    sin = sin[:, None, None, :].to(qk.dtype)
    return qk * cos + rotate_half(qk) * sin
