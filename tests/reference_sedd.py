"""An independent, deliberately plain reference of the ORIGINAL SEDD math (Lou, Meng & Ermon, ICML 2024).

Written from the paper and the original repository's formulas, not from this project's code, for parity tests:

* `reference_forward`: the DiT-style score network, evaluated from a state dict with the published parameter
  names, in float64 by default, with explicit LayerNorm / GELU(tanh) / RoPE / softmax attention. The original
  network has no padding support; a key padding mask is added here (padded keys get weight exactly 0).
* `original_score_entropy_absorb` / `original_score_entropy_uniform`: score entropy in the original
  `pos - neg + const` form (to be evaluated in float64, where its cancellations are harmless).

Shapes: indices [B, L] long, sigma [B], attention_mask [B, L] (1 real, 0 pad); scores are log-scores [..., V].
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

LN_EPS = 1e-5
FREQ_EMBED_DIM = 256
ROPE_BASE = 10_000.0


# ------------------------------------------------------------------------------------------------ pieces
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ b), written as an einsum."""
    out = torch.einsum("...i,oi->...o", x, weight)
    return out if bias is None else out + bias


def layer_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dim with a weight and no bias (biased variance, eps 1e-5)."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + LN_EPS) * weight


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1.0 + torch.exp(-x))


def sinusoidal_embedding(
    sigma: torch.Tensor, dim: int = FREQ_EMBED_DIM, max_period: float = 10000.0
) -> torch.Tensor:
    """[B] -> [B, dim]: cos features first, then sin (GLIDE / DiT timestep embedding)."""
    half = dim // 2
    freqs = torch.tensor([math.exp(-math.log(max_period) * k / half) for k in range(half)], dtype=sigma.dtype)
    args = sigma[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_tables(seq_len: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of positions * inv_freq, each [L, head_dim] = cat(freqs, freqs)."""
    inv_freq = torch.tensor([1.0 / ROPE_BASE ** (j / head_dim) for j in range(0, head_dim, 2)], dtype=dtype)
    positions = torch.arange(seq_len, dtype=dtype)
    freqs = torch.einsum("l,f->lf", positions, inv_freq)
    table = torch.cat([freqs, freqs], dim=-1)
    return torch.cos(table), torch.sin(table)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, D]; cos/sin [L, D]."""
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    return x * cos + rotate_half(x) * sin


def softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Bidirectional attention with an explicit softmax. q, k, v [B, L, H, D] -> [B, L, H, D].

    Padded keys (attention_mask == 0) get weight exactly 0.
    """
    head_dim = q.shape[-1]
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    if attention_mask is not None:
        keep = attention_mask.bool()[:, None, None, :]
        logits = logits.masked_fill(~keep, float("-inf"))
    logits = logits - logits.max(dim=-1, keepdim=True).values
    weights = torch.exp(logits)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v)


# ------------------------------------------------------------------------------------------------ network
def reference_forward(
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping,
    indices: torch.Tensor,
    sigma: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Log-scores [B, L, V] of the original SEDD transformer with the weights `state_dict` (published names).

    `config` is a SEDD run config (keys `graph.type`, `model.{n_blocks, n_heads, hidden_size, scale_by_sigma}`).
    """
    w = {name: tensor.detach().to(dtype) for name, tensor in state_dict.items()}
    model_cfg = config["model"]
    n_blocks = int(model_cfg["n_blocks"])
    n_heads = int(model_cfg["n_heads"])
    hidden = int(model_cfg["hidden_size"])
    head_dim = hidden // n_heads
    scale_by_sigma = bool(model_cfg["scale_by_sigma"])
    batch, seq_len = indices.shape
    sigma = sigma.to(dtype)

    x = w["vocab_embed.embedding"][indices]  # [B, L, hidden]

    c = sinusoidal_embedding(sigma)
    c = linear(c, w["sigma_map.mlp.0.weight"], w["sigma_map.mlp.0.bias"])
    c = silu(c)
    c = linear(c, w["sigma_map.mlp.2.weight"], w["sigma_map.mlp.2.bias"])
    c = silu(c)  # [B, cond]

    cos, sin = rope_tables(seq_len, head_dim, dtype)

    for i in range(n_blocks):
        p = f"blocks.{i}."
        modulation = linear(c, w[p + "adaLN_modulation.weight"], w[p + "adaLN_modulation.bias"])
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            m[:, None, :] for m in modulation.chunk(6, dim=-1)
        )

        # attention
        h = layer_norm(x, w[p + "norm1.weight"]) * (1 + scale_msa) + shift_msa
        qkv = linear(h, w[p + "attn_qkv.weight"]).reshape(batch, seq_len, 3, n_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        attn = softmax_attention(q, k, v, attention_mask).reshape(batch, seq_len, hidden)
        x = x + gate_msa * linear(attn, w[p + "attn_out.weight"])

        # MLP
        h = layer_norm(x, w[p + "norm2.weight"]) * (1 + scale_mlp) + shift_mlp
        h = linear(h, w[p + "mlp.0.weight"], w[p + "mlp.0.bias"])
        h = gelu_tanh(h)
        h = linear(h, w[p + "mlp.2.weight"], w[p + "mlp.2.bias"])
        x = x + gate_mlp * h

    modulation = linear(c, w["output_layer.adaLN_modulation.weight"], w["output_layer.adaLN_modulation.bias"])
    shift, scale = (m[:, None, :] for m in modulation.chunk(2, dim=-1))
    x = layer_norm(x, w["output_layer.norm_final.weight"]) * (1 + scale) + shift
    x = linear(x, w["output_layer.linear.weight"], w["output_layer.linear.bias"])  # [B, L, V]

    if scale_by_sigma:
        vocab = x.shape[-1]
        x = x - torch.log(torch.expm1(sigma))[:, None, None] - math.log(vocab - 1)

    x = x.clone()
    for b in range(batch):
        for pos in range(seq_len):
            x[b, pos, indices[b, pos]] = 0.0
    return x


# ------------------------------------------------------------------------------------------------ loss
def _esigm1(sigma: torch.Tensor) -> torch.Tensor:
    return torch.where(sigma < 0.5, torch.expm1(sigma), torch.exp(sigma) - 1)


def original_score_entropy_absorb(
    score: torch.Tensor,
    sigma: torch.Tensor,
    x: torch.Tensor,
    x0: torch.Tensor,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Original absorbing-graph score entropy `pos - neg + const`, per position [...].

    Non-zero only where x is the mask (index V - 1): pos = sum_{y != mask} e^{s_y}, neg = s_{x0} / esigm1,
    const = (1 / esigm1) (log(1 / esigm1) - 1).
    """
    score = score.to(dtype)
    mask_index = score.shape[-1] - 1
    esigm1 = _esigm1(sigma.to(dtype)).expand(x.shape)
    out = torch.zeros(x.shape, dtype=dtype)
    for idx in torch.nonzero(x == mask_index).tolist():
        idx = tuple(idx)
        s = score[idx]
        ratio = 1.0 / esigm1[idx]
        pos = torch.exp(s[:-1]).sum()
        neg = ratio * s[x0[idx]]
        const = ratio * (torch.log(ratio) - 1)
        out[idx] = pos - neg + const
    return out


def original_score_entropy_uniform(
    score: torch.Tensor,
    sigma: torch.Tensor,
    x: torch.Tensor,
    x0: torch.Tensor,
    dtype: torch.dtype = torch.float64,
    original_ratio: bool = False,
) -> torch.Tensor:
    """Original uniform-graph score entropy `pos - neg + const`, per position [...].

    ratio = esigm1 / (esigm1 + dim) (with `original_ratio=True`: the original code's `1 - dim / (esigm1 + dim)`,
    which is the same number in exact arithmetic but rounds to 0 in float32 for small sigma).
      x == x0: neg = ratio (mean(s) - s_x / dim),              const = (dim - 1) / dim * ratio (log ratio - 1)
      x != x0: neg = s_{x0} / esigm1 + mean(s) - s_x / dim,     const = ((-log ratio - 1) / ratio - (dim - 2)) / dim
      pos = mean(e^s) - e^{s_x} / dim
    """
    score = score.to(dtype)
    dim = score.shape[-1]
    esigm1 = _esigm1(sigma.to(dtype)).expand(x.shape)
    ratio = 1 - dim / (esigm1 + dim) if original_ratio else esigm1 / (esigm1 + dim)
    s_x = torch.gather(score, -1, x[..., None]).squeeze(-1)
    s_x0 = torch.gather(score, -1, x0[..., None]).squeeze(-1)
    centred = score.mean(dim=-1) - s_x / dim
    same = x == x0
    neg = torch.where(same, ratio * centred, s_x0 / esigm1 + centred)
    const = torch.where(
        same,
        (dim - 1) / dim * ratio * (torch.log(ratio) - 1),
        ((-torch.log(ratio) - 1) / ratio - (dim - 2)) / dim,
    )
    pos = torch.exp(score).mean(dim=-1) - torch.exp(s_x) / dim
    return pos - neg + const
