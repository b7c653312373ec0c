"""Estimates of log p(y | x), the likelihood of a completion y given its prompt x under a SEDD model, for the
methods that need it (diffusion DPO, rl/dpo.py; policy gradient, rl/pg.py).

A diffusion model has no closed-form likelihood; the estimates take a collated SFT batch (`input_ids`,
`attention_mask`, `loss_mask` [B, L]: the prompt clean, the completion, its EOS and any EOS fill scored):

ELBO (`elbo_log_prob`), the negative DWDSE averaged over `n_mc` draws of (t, x_t) (SEDD paper, Eq. 11):

    l(y) = -(1 / n_mc) sum_k DWDSE(y; t_k, x_t,k)        E[l(y)] = ELBO(y) <= log p(y | x)

  * bias: a lower bound; the gap (the KL of the model's reverse process to the true posterior of the forward
    process) is small for a well-trained model but not zero, and differs between models and completions, so
    a difference of two ELBOs is an estimate of a log-ratio, not a bound on it.
  * variance: from t and x_t, falling as 1 / n_mc. Two models or two completions compared under the same
    (t, x_t) (common random numbers: draws keyed by example id, `mc_draws`) share most of it, so the variance
    of their difference is far below that of independent draws (tests/unit/test_estimators.py measures it).

Normalised ELBO (`normalized_elbo_log_prob`, absorbing graph): the same bound for the model whose score at a
masked position is renormalised to its exact total mass, i.e. for the denoiser's conditionals
p = softmax(s_theta) over the vocabulary (the MDLM form of the bound). With m = (e^sigma - 1) sum_y s_y the
score's total mass (1 for the exact score) and w = dsigma / (e^sigma - 1) (= 1 / t for log-linear noise),

    DWDSE = sum_masked w (-log p(x0_l)) + sum_masked w (m - log m - 1),     l_norm(y) = E[sum_masked w log p(x0_l)]

  * bias: l_norm >= l (it drops the mass term, >= 0); a lower bound on the log-likelihood of the renormalised
    model. Its gradient cannot lower a completion's estimate by inflating the score's mass at positions that
    every completion shares, which the plain ELBO allows: with negative weights (rejected completions in DPO,
    negative advantages in policy gradient) the ELBO of every completion can fall without the samples getting
    any better.
  * variance: as the ELBO's (same draws, common random numbers).
  The mass term is still needed: the sampler moves tokens out of the mask at a rate set by the score's mass,
  so dpo and pg add it to every sequence's loss (`mass_coef`, as in SFT: it is minimal at the exact mass
  whatever the tokens), which keeps the score calibrated while the normalised part carries the preference.

One-step mean-field (`mean_field_log_prob`, diffu-GRPO, Zhao et al., 2025): mask every completion position
(t = 1; optionally also each prompt token with probability `mask_prompt`, as diffu-GRPO does) and sum the
log-probabilities of the completion tokens under the denoiser, the score normalised over the vocabulary at
each masked position (on the absorbing graph the score of y is p_0(y | x_t) up to a factor of the row):

    l(y) = sum_l log softmax(s_theta(x_t, sigma(1)))_l[y_l]

  * bias: the log-probability of y under the product of the per-position marginals, which ignores the
    dependence between completion tokens: neither a bound on log p(y | x) nor equal to it, but a proper
    log-probability (<= 0, summing to 1 over completions of the same length).
  * variance: none without prompt masking (one deterministic forward pass); with it, from the masked prompt
    positions (drawn like the ELBO's, common random numbers by example id).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from graph_lib import Graph
from losses import LossTerms
from noise_lib import Noise
from rl.buffer import collate
from training import NoiseDraws, autocast, batch_loss, example_noise, perturb_from_draws, to_device

ESTIMATORS = ("elbo", "elbo_normalized", "mean_field")


def mc_draws(ids: Sequence[int], length: int, seed: int, n_mc: int, device: torch.device | str) -> NoiseDraws:
    """`n_mc` draws of (t, x_t) per sequence, draw-major (u_t [n_mc x B], u_move / u_token [n_mc x B, L]).

    Draw k of example `ids[i]` is seeded by (seed, k, id) (`training.example_noise`): two calls with the same
    ids get the same t and the same noised positions, whatever the model or the tokens (common random numbers).
    """
    parts = [example_noise(ids, length, seed, k, torch.device(device)) for k in range(n_mc)]
    return NoiseDraws(
        torch.cat([p.u_t for p in parts]),
        torch.cat([p.u_move for p in parts]),
        torch.cat([p.u_token for p in parts]),
    )


def scored_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The completion positions of a collated batch, [B, L] bool."""
    return batch["loss_mask"].bool() & batch["attention_mask"].bool()


def repeat_batch(batch: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask` and `loss_mask` of a batch repeated `n` times along the batch dimension."""
    return {key: batch[key].repeat(n, 1) for key in ("input_ids", "attention_mask", "loss_mask")}


def denoiser_log_probs(
    model: nn.Module,
    x0: torch.Tensor,
    xt: torch.Tensor,
    sigma: torch.Tensor,
    attention_mask,
    rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p_theta(x0 | x_t) [N] at the `rows` [B, L] positions (row-major), the log-softmax of the model's
    scores over the vocabulary, the mask state excluded (absorbing graph); and the log-sum-exp [N] of those
    raw logits (the log of the score's total mass, up to the row's constant)."""
    logits = model(xt, sigma, attention_mask, output_mask=rows, raw=True)[:, :-1].float()  # [N, dim - 1]
    lse = torch.logsumexp(logits, dim=-1)
    return logits.gather(1, x0[rows][:, None]).squeeze(1) - lse, lse


def sum_at(rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per-row sums [B] of `values` [N] laid out at the True positions of `rows` [B, L] (row-major)."""
    per_token = torch.zeros(rows.shape, dtype=values.dtype, device=values.device)
    return per_token.masked_scatter(rows, values).sum(dim=1)


def elbo_log_prob(
    model: nn.Module,
    graph: Graph,
    noise: Noise,
    batch: dict[str, torch.Tensor],
    draws: NoiseDraws,
    n_mc: int,
    sampling_eps: float = 1e-3,
) -> torch.Tensor:
    """ELBO estimate of log p(y | x) [B] (nats per sequence): minus the DWDSE averaged over the `n_mc` draws
    of `draws` (`mc_draws`), all of them in one forward pass over the batch repeated `n_mc` times."""
    n = batch["input_ids"].shape[0]
    terms = batch_loss(model, repeat_batch(batch, n_mc), graph, noise, draws, sampling_eps)
    return -terms.per_sequence.view(n_mc, n).mean(dim=0)


def normalized_elbo_log_prob(
    model: nn.Module,
    graph: Graph,
    noise: Noise,
    batch: dict[str, torch.Tensor],
    draws: NoiseDraws,
    n_mc: int,
    sampling_eps: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised-ELBO estimate of log p(y | x) [B] (see the module docstring): sum over the masked completion
    positions of w(t) log softmax(s_theta(x_t))[x0], averaged over the `n_mc` draws (the ELBO's (t, x_t));
    and the score-mass term [B], the average of sum w(t) (m - log m - 1) >= 0 over the same draws, so that
    `elbo_log_prob` = l_norm - mass on the same draws."""
    if not graph.absorb:
        raise ValueError(
            "rl.method.estimator=elbo_normalized needs an absorbing-graph model; use estimator=elbo."
        )
    n = batch["input_ids"].shape[0]
    repeated = repeat_batch(batch, n_mc)
    x0 = repeated["input_ids"]
    t, xt = perturb_from_draws(graph, noise, x0, scored_mask(repeated), draws, sampling_eps)
    sigma, dsigma = noise(t)
    rows = scored_mask(repeated) & (xt == graph.dim - 1)
    log_p, lse = denoiser_log_probs(model, x0, xt, sigma, repeated["attention_mask"], rows)
    at = rows.nonzero(as_tuple=True)[0]
    log_esigm1 = torch.expm1(sigma.float()).log()[at]
    scale_by_sigma = getattr(model, "module", model).scale_by_sigma
    # log m = log((e^sigma - 1) sum_y s_y), log s_y = logit_y - shift (as in losses.absorbing_entropy_from_logits)
    log_m = lse - math.log(graph.dim - 1) if scale_by_sigma else lse + log_esigm1
    weight = dsigma.float()[at] / log_esigm1.exp()
    l_norm = sum_at(rows, weight * log_p).view(n_mc, n).mean(dim=0)
    mass = sum_at(rows, weight * (torch.expm1(log_m) - log_m)).view(n_mc, n).mean(dim=0)
    return l_norm, mass


def mean_field_log_prob(
    model: nn.Module,
    graph: Graph,
    noise: Noise,
    batch: dict[str, torch.Tensor],
    draws: NoiseDraws | None = None,
    mask_prompt: float = 0.0,
) -> torch.Tensor:
    """One-step mean-field estimate of log p(y | x) [B]: the completion all masked at t = 1 (and each attended
    prompt token with probability `mask_prompt`, by `draws.u_move`), the log-softmax of the denoiser's scores
    over the vocabulary (the mask state excluded) summed over the completion tokens. Absorbing graph only."""
    if not graph.absorb:
        raise ValueError(
            "The mean-field estimator needs an absorbing-graph model (it reads the denoiser at fully masked "
            "positions); use rl.method.estimator=elbo for a uniform-graph model."
        )
    x0 = batch["input_ids"]
    scored = scored_mask(batch)
    masked = scored
    if mask_prompt > 0:
        if draws is None:
            raise ValueError("mean_field_log_prob with mask_prompt > 0 needs `draws` (mc_draws).")
        prompt = batch["attention_mask"].bool() & ~scored
        masked = scored | (prompt & (draws.u_move[: x0.shape[0]] < mask_prompt))
    xt = torch.where(masked, torch.full_like(x0, graph.dim - 1), x0)
    sigma, _ = noise(torch.ones(x0.shape[0], device=x0.device))
    return sum_at(scored, denoiser_log_probs(model, x0, xt, sigma, batch["attention_mask"], scored)[0])


def sequence_terms(per_sequence: torch.Tensor, n_scored: torch.Tensor) -> LossTerms:
    """`LossTerms` of a sequence-level objective for `training.train_step`, which reads `per_sequence` [B]
    alone (summed over the global batch, divided by its scored tokens)."""
    return LossTerms(
        per_token=per_sequence[:, None],
        per_sequence=per_sequence,
        n_scored=n_scored,
        t=torch.ones_like(per_sequence),
        xt=torch.empty(0, dtype=torch.long, device=per_sequence.device),
    )


@dataclass
class Scorer:
    """The likelihood estimator of a run, with the frozen reference and the batch layout (built once by
    run_rl.py from the method's `scorer`): `log_prob` differentiably on a collated batch, `score` without
    gradients over a list of examples. Batches carry `ids` [B], the example ids that key the noise draws."""

    graph: Graph
    noise: Noise
    reference: nn.Module
    estimator: str = "elbo"
    n_mc: int = 4
    mask_prompt: float = 0.0
    seed: int = 0
    sampling_eps: float = 1e-3
    eos_id: int = 0
    pad_to: int | None = None
    device: torch.device | str = "cpu"
    precision: str = "fp32"
    batch_size: int = 64

    def log_prob(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """log p(y | x) estimates [B] of a collated batch with `ids` [B] (same ids: same noise)."""
        return self.log_prob_and_mass(model, batch)[0]

    def log_prob_and_mass(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`log_prob` [B] and the score-mass term [B] of `elbo_normalized` (zeros for the other estimators):
        the part of minus the ELBO that only calibrates the score's total mass, whatever the tokens."""
        ids = batch["ids"].tolist()
        length = batch["input_ids"].shape[1]
        device = batch["input_ids"].device
        if self.estimator == "mean_field":
            draws = mc_draws(ids, length, self.seed, 1, device) if self.mask_prompt else None
            log_p = mean_field_log_prob(model, self.graph, self.noise, batch, draws, self.mask_prompt)
            return log_p, torch.zeros_like(log_p)
        draws = mc_draws(ids, length, self.seed, self.n_mc, device)
        if self.estimator == "elbo":
            log_p = elbo_log_prob(model, self.graph, self.noise, batch, draws, self.n_mc, self.sampling_eps)
            return log_p, torch.zeros_like(log_p)
        return normalized_elbo_log_prob(
            model, self.graph, self.noise, batch, draws, self.n_mc, self.sampling_eps
        )

    def collate(self, examples: Sequence[dict[str, Any]], ids: Sequence[int]) -> dict[str, torch.Tensor]:
        """SFT examples (`rl.buffer.make_example`) as a batch on the device, with their noise `ids`."""
        batch = collate(examples, self.eos_id, self.pad_to)
        batch["ids"] = torch.tensor([int(i) for i in ids], dtype=torch.long)
        return to_device(batch, torch.device(self.device))

    @torch.no_grad()
    def score(self, model: nn.Module, examples: Sequence[dict[str, Any]], ids: Sequence[int]) -> torch.Tensor:
        """log p(y | x) estimates [N] (float32, CPU) of `examples` under `model` (in eval mode), in chunks of
        `batch_size` forward rows (sequences times ELBO draws); example i is noised by `ids[i]`."""
        out = []
        size = max(1, self.batch_size // (1 if self.estimator == "mean_field" else self.n_mc))
        for start in range(0, len(examples), size):
            chunk = slice(start, start + size)
            batch = self.collate(examples[chunk], ids[chunk])
            with autocast(self.precision, torch.device(self.device)):
                out.append(self.log_prob(model, batch).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


@dataclass
class LikelihoodMethod:
    """The estimator options shared by the likelihood-ratio methods (dpo, pg): `estimator` (elbo |
    elbo_normalized | mean_field), `n_mc` draws of the ELBOs, `mask_prompt` (mean_field: share of prompt
    tokens masked), `mass_coef` (elbo_normalized: weight of the score-mass term in every sequence's loss)."""

    estimator: str = "elbo_normalized"
    n_mc: int = 4
    mask_prompt: float = 0.0
    mass_coef: float = 1.0

    needs_reference: ClassVar[bool] = True  # run_rl.py keeps a frozen copy of the starting model

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(
                f"rl.method.estimator={self.estimator!r} is not valid; choose one of {ESTIMATORS}."
            )
        if self.n_mc < 1:
            raise ValueError(f"rl.method.n_mc={self.n_mc} must be at least 1 (draws of t per ELBO estimate).")
        if not 0 <= self.mask_prompt < 1:
            raise ValueError(f"rl.method.mask_prompt={self.mask_prompt} must be in [0, 1).")
        if self.mass_coef < 0:
            raise ValueError(f"rl.method.mass_coef={self.mass_coef} must be >= 0 (1: as in SFT).")

    def scorer(self, graph: Graph, noise: Noise, reference: nn.Module, **layout: Any) -> Scorer:
        """The run's `Scorer` with this method's estimator; `layout`: seed, sampling_eps, eos_id, pad_to,
        device, precision, batch_size."""
        return Scorer(
            graph,
            noise,
            reference,
            estimator=self.estimator,
            n_mc=self.n_mc,
            mask_prompt=self.mask_prompt,
            **layout,
        )
