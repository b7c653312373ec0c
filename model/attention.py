"""Bidirectional multi-head attention: a varlen flash kernel on CUDA (the flash-attn package when installed, else
torch's own `torch.nn.attention.varlen.varlen_attn`, torch >= 2.10), torch SDPA otherwise.

Padded batches are packed once per forward pass (`Packing`): the network then runs on the T real tokens only,
so its cost follows real tokens, not B x max_length. `packed_attention` attends within each sequence of the
packed rows: with a varlen kernel directly on them (varlen, `cu_seqlens`), with SDPA by laying them back out as
[B, L] behind a key mask. `attention` takes a padded batch with an optional `attention_mask` [B, L]
(1 = real token, 0 = padding): padded keys are never attended to, so outputs at real positions do not depend
on padding; outputs at padded positions are unspecified (zero on the flash path) and must be ignored.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
try:
    from torch.nn.attention.varlen import varlen_attn as torch_varlen_attn
except ImportError:  # torch < 2.10
    torch_varlen_attn = None


def _flash_attn_varlen(qkv: torch.Tensor, packing: Packing) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_qkvpacked_func

    return flash_attn_varlen_qkvpacked_func(qkv, packing.cu_seqlens, packing.max_len, 0.0, causal=False)


def _torch_varlen(qkv: torch.Tensor, packing: Packing) -> torch.Tensor:
    q, k, v = qkv.unbind(1)
    cu, max_len = packing.cu_seqlens, packing.max_len
    return torch_varlen_attn(q, k, v, cu, cu, max_len, max_len)  # non-causal by default


def varlen_kernel(qkv: torch.Tensor) -> Callable[[torch.Tensor, Packing], torch.Tensor] | None:
    """The varlen kernel for packed CUDA half/bf16 `qkv` [T, 3, H, D] -> [T, H, D], or None (then SDPA)."""
    if not (qkv.is_cuda and qkv.dtype in (torch.float16, torch.bfloat16)):
        return None
    if HAS_FLASH_ATTN:
        return _flash_attn_varlen
    return _torch_varlen if torch_varlen_attn is not None else None


@dataclass(frozen=True)
class Packing:
    """The real tokens of a padded batch [B, L] as T packed rows, in row-major order.

    index [T]: flat position b * L + l of each real token; sequence [T]: its b; position [T]: its l;
    cu_seqlens [B + 1] int32: cumulative real lengths (flash-attn's varlen layout); max_len: the longest;
    attention_mask [B, L] bool. Real tokens need not be contiguous: attention only groups them by sequence.
    """

    index: torch.Tensor
    sequence: torch.Tensor
    position: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int
    attention_mask: torch.Tensor

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> Packing:
        mask = attention_mask.bool()
        seq_len = mask.shape[1]
        index = mask.reshape(-1).nonzero(as_tuple=True)[0]
        lengths = mask.sum(dim=1, dtype=torch.int32)
        cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        return cls(index, index // seq_len, index % seq_len, cu_seqlens, int(lengths.max()), mask)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> [T, ...]."""
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [B, L, ...], zero at padded positions."""
        batch, seq_len = self.attention_mask.shape
        full = x.new_zeros(batch * seq_len, *x.shape[1:]).index_copy(0, self.index, x)
        return full.view(batch, seq_len, *x.shape[1:])


def sdpa_attention(qkv: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [B, L, 3, H, D] -> [B, L, H, D] with torch's scaled_dot_product_attention."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, D]
    mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2)


def packed_attention(qkv: torch.Tensor, packing: Packing) -> torch.Tensor:
    """Packed qkv [T, 3, H, D] -> [T, H, D], each token attending to the real tokens of its own sequence."""
    kernel = varlen_kernel(qkv)
    if kernel is not None:
        return kernel(qkv, packing)
    return packing.pack(sdpa_attention(packing.unpack(qkv), packing.attention_mask))


def varlen_attention(qkv: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """qkv [B, L, 3, H, D] -> [B, L, H, D] through `packed_attention`, padding removed."""
    packing = Packing.from_mask(attention_mask)
    return packing.unpack(packed_attention(packing.pack(qkv), packing))


def attention(qkv: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch to the fastest exact kernel for `qkv` [B, L, 3, H, D]; returns [B, L, H, D]. Without padding
    SDPA is itself a flash kernel on CUDA; with padding a varlen kernel skips the padded tokens entirely."""
    if attention_mask is not None and varlen_kernel(qkv) is not None:
        return varlen_attention(qkv, attention_mask)
    return sdpa_attention(qkv, attention_mask)
