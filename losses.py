"""The denoising score-entropy loss (DWDSE, SEDD paper Eq. 11) with conditioning and padding masks.

For data x0 [B, L], t ~ U(eps, 1), sigma = sigma_bar(t), dsigma = sigma(t) and x_t ~ exp(sigma Q) x0,

    loss(x0) = sum_l dsigma * SE(s_theta(x_t, sigma)_l, x_t[l], x0[l])          (nats per sequence),

whose expectation over t is the negative ELBO (an upper bound on -log p(x0)). Two masks:
  * `loss_mask` [B, L]: positions that are perturbed and scored. Every other position stays equal to x0 and
    only conditions the model (prompt tokens in SFT); it contributes exactly 0.
  * `attention_mask` [B, L]: 1 for real tokens, 0 for padding (never attended to, never scored).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from graph_lib import Graph
from noise_lib import Noise


@dataclass
class LossTerms:
    """per_token [B, L] (dsigma-weighted score entropy, 0 off the loss mask); per_sequence [B] (a one-sample
    estimate of the negative ELBO of the scored tokens given the rest); n_scored [B]; t [B]; xt [B, L]."""

    per_token: torch.Tensor
    per_sequence: torch.Tensor
    n_scored: torch.Tensor
    t: torch.Tensor
    xt: torch.Tensor

    def mean_per_token(self) -> torch.Tensor:
        """Loss per scored token in nats (the training objective)."""
        return self.per_sequence.sum() / self.n_scored.sum().clamp(min=1)


def sample_t(batch_size: int, device: torch.device, eps: float = 1e-3, generator=None) -> torch.Tensor:
    """t ~ U(eps, 1), [B]."""
    return (1 - eps) * torch.rand(batch_size, device=device, generator=generator) + eps


def perturb(
    graph: Graph, x0: torch.Tensor, sigma: torch.Tensor, loss_mask: torch.Tensor | None
) -> torch.Tensor:
    """x_t ~ exp(sigma Q) x0 on the loss mask; other positions stay clean. x0 [B, L], sigma [B]."""
    xt = graph.sample_transition(x0, sigma[:, None])
    return xt if loss_mask is None else torch.where(loss_mask.bool(), xt, x0)


class _AbsorbingEntropyFromLogits(torch.autograd.Function):
    """Forward and hand-written backward of `absorbing_entropy_from_logits`: one [N, dim] buffer, which holds
    the scores in the forward pass and becomes the gradient in the backward pass (so backward runs once)."""

    @staticmethod
    def forward(ctx, logits, x0, shift, log_esigm1):
        dtype = shift.dtype  # float32, or float64 for float64 logits
        scores = torch.empty(logits.shape, dtype=dtype, device=logits.device)
        torch.sub(logits, shift[:, None], out=scores).exp_()  # s_y, [N, dim]
        scores[:, -1] = 0.0  # the mask state does not enter
        scores.scatter_(1, x0[:, None], 0.0)  # nor does x0 (its term is below)
        u = logits.gather(1, x0[:, None]).squeeze(1).to(dtype) - shift + log_esigm1
        ratio = (-log_esigm1).exp()  # true ratio 1 / esigm1 at x0
        entropy = scores.sum(dim=1) + ratio * (torch.expm1(u) - u)
        ctx.save_for_backward(scores, x0, u, ratio)
        ctx.logits_dtype = logits.dtype
        ctx.used = False
        return entropy

    @staticmethod
    def backward(ctx, grad_entropy):
        if ctx.used:
            raise RuntimeError("the absorbing loss supports one backward pass (no retain_graph)")
        ctx.used = True
        scores, x0, u, ratio = ctx.saved_tensors
        grad = scores.mul_(grad_entropy[:, None])  # d s_y / d logit_y = s_y; 0 for the mask state
        grad.scatter_(1, x0[:, None], (grad_entropy * ratio * torch.expm1(u))[:, None])
        return grad.to(ctx.logits_dtype), None, None, None


def absorbing_entropy_from_logits(
    logits: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, scale_by_sigma: bool
) -> torch.Tensor:
    """Absorbing-graph score entropy at masked positions, straight from the output layer's logits.

    logits [N, dim] (the last column is the mask state), x0 [N], sigma [N] -> [N]. Equal to
    `Absorbing.score_entropy(log_score, sigma, mask, x0)` for the model's log-scores
    log s_y = logits_y - shift, shift = log(e^sigma - 1) + log(dim - 1) with `scale_by_sigma` (else 0):

        sum_{y != mask, x0} s_y + (1 / esigm1) f(log s_{x0} + log esigm1),   f(u) = e^u - u - 1,

    computed with one vocabulary-sized buffer (s_y, whose x0 entry is zeroed rather than subtracted) that
    also serves as the gradient d/d logit_y = s_y; the x0 entry's gradient is (1 / esigm1) (e^u - 1).
    Computed in float32 (float64 for float64 logits), whatever the autocast dtype of `logits`.
    """
    log_esigm1 = torch.expm1(sigma.to(torch.promote_types(logits.dtype, torch.float32))).log()
    shift = log_esigm1 + math.log(logits.shape[-1] - 1) if scale_by_sigma else torch.zeros_like(log_esigm1)
    return _AbsorbingEntropyFromLogits.apply(logits, x0, shift, log_esigm1)


def score_entropy_loss(
    model: nn.Module,
    x0: torch.Tensor,
    graph: Graph,
    noise: Noise,
    *,
    loss_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    xt: torch.Tensor | None = None,
    sampling_eps: float = 1e-3,
) -> LossTerms:
    """DWDSE of `model` on x0 [B, L]; see the module docstring for the masks. `t` [B] and `xt` [B, L] may be
    given (common random numbers); `loss_mask` defaults to `attention_mask`, then to all positions.

    On the absorbing graph only masked positions have non-zero score entropy, so the model's output layer is
    evaluated there alone (exactly equal to the full computation).
    """
    if loss_mask is None:
        loss_mask = attention_mask
    scored = torch.ones_like(x0, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
    if attention_mask is not None:
        scored = scored & attention_mask.bool()
    if t is None:
        t = sample_t(x0.shape[0], x0.device, sampling_eps)
    sigma, dsigma = noise(t)
    if xt is None:
        xt = perturb(graph, x0, sigma, scored)

    if graph.absorb:
        rows = scored & (xt == graph.dim - 1)
        logits = model(xt, sigma, attention_mask, output_mask=rows, raw=True)  # [N, dim]
        batch_index = rows.nonzero(as_tuple=True)[0]
        scale_by_sigma = getattr(model, "module", model).scale_by_sigma
        entropy = absorbing_entropy_from_logits(logits, x0[rows], sigma[batch_index], scale_by_sigma)
        per_token = torch.zeros(x0.shape, dtype=entropy.dtype, device=x0.device)
        per_token = per_token.masked_scatter(rows, dsigma[batch_index] * entropy)
    else:
        log_score = model(xt, sigma, attention_mask)
        entropy = graph.score_entropy(log_score, sigma[:, None], xt, x0)
        per_token = torch.where(scored, dsigma[:, None] * entropy, torch.zeros_like(entropy))
    return LossTerms(per_token, per_token.sum(dim=-1), scored.sum(dim=-1), t, xt)
