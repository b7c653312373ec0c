"""Bidirectional multi-head attention: flash-attn's varlen kernel on CUDA when installed, torch SDPA otherwise.

Both paths take an optional `attention_mask` [B, L] (1 = real token, 0 = padding): padded keys are never
attended to, so outputs at real positions do not depend on padding. Outputs at padded positions are
unspecified (zero on the flash path) and must be ignored by the caller.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def use_flash_attn(qkv: torch.Tensor) -> bool:
    """Flash-attn applies to CUDA half/bf16 tensors when the package is installed."""
    return HAS_FLASH_ATTN and qkv.is_cuda and qkv.dtype in (torch.float16, torch.bfloat16)


def sdpa_attention(qkv: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [B, L, 3, H, D] -> [B, L, H, D] with torch's scaled_dot_product_attention."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, D]
    mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2)


def flash_attention(qkv: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [B, L, 3, H, D] -> [B, L, H, D] with flash_attn_varlen_qkvpacked_func, padding removed."""
    from flash_attn import flash_attn_varlen_qkvpacked_func

    batch, seq_len = qkv.shape[:2]
    if attention_mask is None:
        lengths = torch.full((batch,), seq_len, dtype=torch.int32, device=qkv.device)
        packed = qkv.reshape(batch * seq_len, *qkv.shape[2:])
        index = None
    else:
        lengths = attention_mask.sum(dim=-1, dtype=torch.int32)
        index = attention_mask.reshape(-1).nonzero(as_tuple=True)[0]
        packed = qkv.reshape(batch * seq_len, *qkv.shape[2:]).index_select(0, index)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    max_len = seq_len if attention_mask is None else int(lengths.max())
    out = flash_attn_varlen_qkvpacked_func(packed, cu_seqlens, max_len, 0.0, causal=False)
    if index is None:
        return out.view(batch, seq_len, *out.shape[1:])
    full = out.new_zeros(batch * seq_len, *out.shape[1:])
    full.index_copy_(0, index, out)
    return full.view(batch, seq_len, *out.shape[1:])


def attention(qkv: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch to the fastest exact kernel for `qkv` [B, L, 3, H, D]; returns [B, L, H, D]."""
    if use_flash_attn(qkv):
        return flash_attention(qkv, attention_mask)
    return sdpa_attention(qkv, attention_mask)
