"""Policy gradient for SEDD, GRPO-style (Shao et al., 2024; for diffusion LMs: diffu-GRPO, Zhao et al., 2025):
k completions per prompt, advantages normalised within each prompt's group, a clipped importance ratio
between the current policy and the policy that sampled, several updates per batch of rollouts
(`rl.epochs` passes over it), and a KL penalty to the frozen starting model.

For completion i of prompt g with reward r_i, n_i scored tokens and log-likelihood estimates l (the method's
estimator, rl/estimators.py, under the same noise for every model: common random numbers):

    A_i      = (r_i - mean_g r) / (std_g r + 1e-6)        (`normalize=batch`: over the batch; `scale_std=False`:
                                                           no division, Dr. GRPO)
    rho_i    = exp((l_theta(y_i) - l_old(y_i)) / n_i)     per-token (length-normalised) sequence ratio, as GSPO
    d_i      = (l_ref(y_i) - l_theta(y_i)) / n_i
    KL_i     = exp(d_i) - d_i - 1                          k3 estimator (Schulman, 2020): >= 0, 0 at the reference
    loss_i   = -min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i) + beta KL_i
                                                           (the per-token log-ratios clamped to +-20 first)

An update minimises sum_i n_i loss_i / sum_i n_i (`training.train_step`'s token normalisation), whose gradient at
rho = 1 is -sum_i A_i grad l_theta(y_i) / sum_i n_i: the token-level REINFORCE of DAPO / Dr. GRPO. l_old is
estimated once, right after sampling, with the sampling weights, so rho = 1 and nothing is clipped on an
iteration's first update (exactly, with dropout off). Plain REINFORCE with a baseline is the special case
`rl.k=1 normalize=batch clip_eps=null rl.epochs=1` (advantage: reward minus the batch mean).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from losses import LossTerms
from rl.buffer import Selection, group_ids, uniform_groups
from rl.estimators import LikelihoodMethod, Scorer, scored_mask, sequence_terms

NORMALIZATIONS = ("group", "batch")
MAX_LOG_RATIO = 20.0  # per-token log-ratios are clamped here before exp: a jumpy estimate cannot overflow


def group_advantages(
    rewards: torch.Tensor | Sequence[float],
    groups: torch.Tensor | Sequence[int],
    scale_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """A_i = (r_i - mean r) / (std r + eps) within each group [N] (population std; `scale_std=False`: the
    centred reward only). Equal rewards in a group give A = 0."""
    r = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    g = torch.as_tensor(groups, dtype=torch.long).reshape(-1)
    if r.shape != g.shape:
        raise ValueError(f"{r.numel()} rewards but {g.numel()} group ids; give one group id per reward.")
    advantages = torch.zeros_like(r)
    for group in torch.unique(g):
        at = g == group
        centred = r[at] - r[at].mean()
        advantages[at] = centred / (r[at].std(unbiased=False) + eps) if scale_std else centred
    return advantages.float()


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    n_tokens: torch.Tensor,
    clip_eps: float | None = 0.2,
    beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sequence clipped surrogate plus KL penalty [B] (see the module docstring) from log-likelihood
    estimates [B] under the current, sampling and reference policies, advantages [B] and scored tokens [B];
    with the ratio, KL and clipped indicator [B] (`clip_eps=None`: no clipping)."""
    n = n_tokens.to(logp.dtype).clamp(min=1)
    ratio = torch.exp(((logp - old_logp) / n).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    surrogate = ratio * advantages
    clipped = torch.zeros_like(ratio, dtype=torch.bool)
    if clip_eps is not None:
        bounded = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages
        clipped = bounded < surrogate
        surrogate = torch.minimum(surrogate, bounded)
    d = ((ref_logp - logp) / n).clamp(max=MAX_LOG_RATIO)
    kl = torch.exp(d) - d - 1
    loss = -surrogate + beta * kl
    return loss, {"ratio": ratio.detach(), "kl": kl.detach(), "clipped": clipped}


@dataclass
class PolicyGradient(LikelihoodMethod):
    """GRPO-style policy gradient: see the module docstring. Configured by configs/rl/method/pg.yaml."""

    beta: float = 0.04
    clip_eps: float | None = 0.2
    normalize: str = "group"
    scale_std: bool = True
    skip_uniform: bool = True

    name: ClassVar[str] = "pg"
    offline: ClassVar[None] = None  # always samples from the policy

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(
                f"rl.method.normalize={self.normalize!r} is not valid; choose one of {NORMALIZATIONS}."
            )
        if self.beta < 0:
            raise ValueError(f"rl.method.beta={self.beta} must be >= 0 (the KL coefficient).")
        if self.clip_eps is not None and not 0 < self.clip_eps < 1:
            raise ValueError(
                f"rl.method.clip_eps={self.clip_eps} must be in (0, 1), or null for no clipping."
            )

    @property
    def min_group_size(self) -> int:
        """rl.k needed: 2 to normalise within groups, 1 over the batch (REINFORCE with a baseline)."""
        return 2 if self.normalize == "group" else 1

    def select(
        self,
        rewards: Sequence[float],
        group_size: int,
        groups: Sequence[int] | None = None,
        keys: Sequence[Hashable] | None = None,
        kl: Sequence[float] | None = None,
    ) -> Selection:
        """Every completion with its advantage as weight; with `skip_uniform`, not those of groups whose
        rewards are all equal (zero advantage: no policy gradient, DAPO's dynamic sampling)."""
        n = len(rewards)
        g = group_ids(n, group_size, groups, self.normalize)
        r = torch.tensor([float(x) for x in rewards], dtype=torch.float64)
        advantages = group_advantages(r, g, self.scale_std)
        uniform = uniform_groups(r, g)
        rows = [i for i in range(n) if not (self.skip_uniform and int(g[i]) in uniform)]
        metrics = {
            "acceptance": len(rows) / max(n, 1),
            "groups_with_signal": 1 - len(uniform) / max(len(torch.unique(g)), 1),
            "advantage_abs_mean": float(advantages.abs().mean()) if n else 0.0,
        }
        return Selection(rows, [float(advantages[i]) for i in rows], metrics)

    def prepare(
        self, examples: list[dict[str, Any]], policy: nn.Module, scorer: Scorer, id_base: int
    ) -> list[dict[str, Any]]:
        """Each selected completion (`weight`: its advantage) with its noise id `id_base + j` and its
        log-likelihood estimates under the sampling policy (`policy`, eval mode) and the reference."""
        ids = [id_base + j for j in range(len(examples))]
        old = scorer.score(policy, examples, ids).tolist()
        ref = scorer.score(scorer.reference, examples, ids).tolist()
        return [
            dict(ex, id=i, advantage=ex["weight"], old_logp=o, ref_logp=r)
            for ex, i, o, r in zip(examples, ids, old, ref, strict=True)
        ]

    def collate(self, examples: Sequence[dict[str, Any]], scorer: Scorer) -> dict[str, torch.Tensor]:
        """Prepared completions as a batch with `advantage`, `old_logp` and `ref_logp` [B]."""
        batch = scorer.collate(examples, [ex["id"] for ex in examples])
        for key in ("advantage", "old_logp", "ref_logp"):
            batch[key] = torch.tensor(
                [ex[key] for ex in examples], dtype=torch.float32, device=batch["input_ids"].device
            )
        return batch

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], scorer: Scorer
    ) -> tuple[LossTerms, dict[str, float]]:
        """`grpo_loss` of a collated batch, each sequence weighted by its scored tokens, plus `mass_coef` times
        its score-mass term (elbo_normalized), and its metrics."""
        logp, mass = scorer.log_prob_and_mass(model, batch)
        logp = logp.float()
        n_tokens = scored_mask(batch).sum(dim=1)
        loss, parts = grpo_loss(
            logp,
            batch["old_logp"],
            batch["ref_logp"],
            batch["advantage"],
            n_tokens,
            self.clip_eps,
            self.beta,
        )
        metrics = {
            "pg_loss": float(loss.detach().mean()),
            "ratio_mean": float(parts["ratio"].mean()),
            "ratio_max_dev": float((parts["ratio"] - 1).abs().max()),
            "clip_frac": float(parts["clipped"].float().mean()),
            "kl_ref": float(parts["kl"].mean()),
            "score_mass": float(mass.detach().sum() / n_tokens.sum().clamp(min=1)),
        }
        return sequence_terms(loss * n_tokens + self.mass_coef * mass, n_tokens), metrics
