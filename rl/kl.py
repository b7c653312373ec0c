"""KL(policy || reference) of a SEDD policy to its starting model, estimated with the ELBO.

For completions x ~ pi (the prompt conditioning), KL(pi || ref) = E_x[log pi(x) - log ref(x)]. SEDD gives no
exact log-likelihood, but its DWDSE is the negative ELBO, -log p(x) <= DWDSE_p(x) (SEDD paper, Eq. 11), so

    KL_hat = mean_x [ DWDSE_ref(x) - DWDSE_pi(x) ] / mean_x n_scored(x)       (nats per completion token)

with both losses evaluated at the same t and x_t (common random numbers: `training.perturb_from_draws`
with one set of draws), which removes most of the variance of the difference. It is a difference of two
bounds, not a bound itself: exact only when both ELBO gaps are equal, and it can be slightly negative.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from graph_lib import Graph
from noise_lib import Noise
from training import autocast, batch_loss, example_noise, to_device


@torch.no_grad()
def elbo_kl(
    policy: nn.Module,
    reference: nn.Module,
    graph: Graph,
    noise: Noise,
    batch: dict[str, torch.Tensor],
    *,
    ids: Sequence[int],
    seed: int,
    draw: int = 0,
    sampling_eps: float = 1e-3,
    precision: str = "fp32",
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence `DWDSE_ref(x) - DWDSE_pi(x)` [B] (nats, an estimate of log pi(x) - log ref(x)) and the
    scored tokens [B], for a collated SFT batch (`input_ids`, `attention_mask`, `loss_mask` [B, L]).

    `ids` [B] (unique example ids), `seed` and `draw` fix t and x_t per sequence, shared by both models.
    Both models should be in eval mode.
    """
    device = torch.device(device)
    batch = to_device(batch, device)
    draws = example_noise(ids, batch["input_ids"].shape[1], seed, draw, device)
    with autocast(precision, device):
        ref = batch_loss(reference, batch, graph, noise, draws, sampling_eps)
        pol = batch_loss(policy, batch, graph, noise, draws, sampling_eps)
    return (ref.per_sequence.float() - pol.per_sequence.float()).cpu(), pol.n_scored.cpu()


def kl_per_token(diff: torch.Tensor, n_scored: torch.Tensor) -> float:
    """The batch estimate: sum of per-sequence differences over the sum of scored tokens (nats/token)."""
    return float(diff.sum() / n_scored.sum().clamp(min=1))
