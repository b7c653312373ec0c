"""The denoising score-entropy loss (DWDSE, SEDD paper Eq. 11) with conditioning and padding masks.

For data x0 [B, L], t ~ U(eps, 1), sigma = sigma_bar(t), dsigma = sigma(t) and x_t ~ exp(sigma Q) x0,

    loss(x0) = sum_l dsigma * SE(s_theta(x_t, sigma)_l, x_t[l], x0[l])          (nats per sequence),

whose expectation over t is the negative ELBO (an upper bound on -log p(x0)). Two masks:
  * `loss_mask` [B, L]: positions that are perturbed and scored. Every other position stays equal to x0 and
    only conditions the model (prompt tokens in SFT); it contributes exactly 0.
  * `attention_mask` [B, L]: 1 for real tokens, 0 for padding (never attended to, never scored).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from graph_lib import Graph
from noise_lib import Noise

# How `absorbing_entropy_from_logits` computes: "one_buffer" (eager, one float32 [N, dim] buffer that becomes
# the gradient) or "fused" (two passes over the logits and no vocabulary-sized buffer of its own, compiled on
# CUDA). None picks "fused" on CUDA with Triton, else "one_buffer".
LOSS_KERNELS = ("one_buffer", "fused")


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


def _fused_entropy_terms(logits, x0, shift, log_esigm1):
    """The forward of the "fused" kernel as one reduction over `logits` [N, dim]: (entropy, u, ratio), each
    [N], in shift's dtype. Written without in-place ops so that torch.compile makes one pass of it."""
    dim = logits.shape[-1]
    columns = torch.arange(dim, device=logits.device)
    excluded = (columns == dim - 1) | (columns == x0[:, None])  # the mask state and x0 (its term is below)
    scores = torch.where(excluded, 0.0, (logits.to(shift.dtype) - shift[:, None]).exp())
    u = logits.gather(1, x0[:, None]).squeeze(1).to(shift.dtype) - shift + log_esigm1
    ratio = (-log_esigm1).exp()
    return scores.sum(dim=1) + ratio * (torch.expm1(u) - u), u, ratio


def _fused_entropy_grad(logits, x0, shift, u, ratio, grad_entropy):
    """The backward of the "fused" kernel as one elementwise pass: d entropy / d logits [N, dim] times
    grad_entropy [N], in the logits' dtype (s_y off x0, (1 / esigm1)(e^u - 1) at x0, 0 for the mask state)."""
    dim = logits.shape[-1]
    columns = torch.arange(dim, device=logits.device)
    grad = (logits.to(shift.dtype) - shift[:, None]).exp() * grad_entropy[:, None]
    grad = torch.where(columns == x0[:, None], (grad_entropy * ratio * torch.expm1(u))[:, None], grad)
    return torch.where(columns == dim - 1, 0.0, grad).to(logits.dtype)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


class _FusedAbsorbingEntropy(torch.autograd.Function):
    """The "fused" kernel: the forward is a reduction over the logits and the backward recomputes s_y from them,
    so the only [N, dim] tensors are the logits (saved, in their own dtype: bf16 under autocast) and the
    gradient. Compiled (`compiled=True`), each is a single pass; eager, the same numbers with temporaries."""

    @staticmethod
    def forward(ctx, logits, x0, shift, log_esigm1, compiled):
        terms = _compiled(_fused_entropy_terms) if compiled else _fused_entropy_terms
        entropy, u, ratio = terms(logits, x0, shift, log_esigm1)
        ctx.save_for_backward(logits, x0, shift, u, ratio)
        ctx.compiled = compiled
        return entropy

    @staticmethod
    def backward(ctx, grad_entropy):
        grad_fn = _compiled(_fused_entropy_grad) if ctx.compiled else _fused_entropy_grad
        return grad_fn(*ctx.saved_tensors, grad_entropy), None, None, None, None


def default_loss_kernel(device: torch.device) -> str:
    """The loss kernel `absorbing_entropy_from_logits` uses on `device` when given none: "fused" (compiled) on
    CUDA when Triton is there, else "one_buffer" (see LOSS_KERNELS)."""
    from torch.utils._triton import has_triton

    return "fused" if device.type == "cuda" and has_triton() else "one_buffer"


def absorbing_entropy_from_logits(
    logits: torch.Tensor,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    scale_by_sigma: bool,
    kernel: str | None = None,
) -> torch.Tensor:
    """Absorbing-graph score entropy at masked positions, straight from the output layer's logits.

    logits [N, dim] (the last column is the mask state), x0 [N], sigma [N] -> [N]. Equal to
    `Absorbing.score_entropy(log_score, sigma, mask, x0)` for the model's log-scores
    log s_y = logits_y - shift, shift = log(e^sigma - 1) + log(dim - 1) with `scale_by_sigma` (else 0):

        sum_{y != mask, x0} s_y + (1 / esigm1) f(log s_{x0} + log esigm1),   f(u) = e^u - u - 1,

    whose gradient is d/d logit_y = s_y off x0 and (1 / esigm1) (e^u - 1) at x0. Computed in float32 (float64
    for float64 logits), whatever the autocast dtype of `logits`. `kernel` (LOSS_KERNELS; None: the
    device's default) only changes speed and memory: "one_buffer" holds s_y in one buffer that becomes the
    gradient (one backward pass only); "fused" is compiled on CUDA and holds nothing vocabulary-sized.
    """
    kernel = kernel or default_loss_kernel(logits.device)
    if kernel not in LOSS_KERNELS:
        raise ValueError(f"loss kernel {kernel!r} is not valid; choose one of {LOSS_KERNELS}.")
    log_esigm1 = torch.expm1(sigma.to(torch.promote_types(logits.dtype, torch.float32))).log()
    shift = log_esigm1 + math.log(logits.shape[-1] - 1) if scale_by_sigma else torch.zeros_like(log_esigm1)
    if kernel == "fused":
        return _FusedAbsorbingEntropy.apply(logits, x0, shift, log_esigm1, logits.is_cuda)
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
    loss_kernel: str | None = None,
) -> LossTerms:
    """DWDSE of `model` on x0 [B, L]; see the module docstring for the masks. `t` [B] and `xt` [B, L] may be
    given (common random numbers); `loss_mask` defaults to `attention_mask`, then to all positions;
    `loss_kernel` is `absorbing_entropy_from_logits`'s `kernel`.

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
        entropy = absorbing_entropy_from_logits(
            logits, x0[rows], sigma[batch_index], scale_by_sigma, loss_kernel
        )
        per_token = torch.zeros(x0.shape, dtype=entropy.dtype, device=x0.device)
        per_token = per_token.masked_scatter(rows, dsigma[batch_index] * entropy)
    else:
        log_score = model(xt, sigma, attention_mask)
        entropy = graph.score_entropy(log_score, sigma[:, None], xt, x0)
        per_token = torch.where(scored, dsigma[:, None] * entropy, torch.zeros_like(entropy))
    return LossTerms(per_token, per_token.sum(dim=-1), scored.sum(dim=-1), t, xt)
