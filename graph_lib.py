"""Diffusion graphs: the rate matrix Q of the forward CTMC dp_t/dt = sigma(t) Q p_t (SEDD paper, Section 3).

Same API as the original SEDD repository. Shapes: token ids `i`/`x`/`x0` are [...] long; `score` is the
model's log-score log s_theta(x)_y with shape [..., dim]; `sigma`/`dsigma` broadcast against `x`
(e.g. [B, 1] for a batch [B, L]).

Score entropy (paper Eq. 5/8) for a current state x with true ratios r_y = p_t(y | x0) / p_t(x | x0) is

    sum_{y != x} Q(x, y) [ s_y - r_y log s_y + K(r_y) ],   K(a) = a (log a - 1),

which we evaluate in its equivalent Bregman form  Q(x, y) r_y f(log s_y - log r_y),  f(u) = e^u - u - 1 >= 0
(and Q(x, y) s_y where r_y = 0). The value is identical to the original code's `pos - neg + const`, but it
never subtracts large nearly-equal terms, so it stays accurate in float32 down to tiny sigma.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F


def get_graph(config: Mapping[str, Any], device: torch.device | str | None = None) -> Graph:
    """Build the graph named by `config.graph.type` (`absorb` or `uniform`) over `config.tokens` tokens.

    `device` is accepted for compatibility with the original signature; graphs hold no tensors.
    """
    kind = config["graph"]["type"]
    graphs = {"absorb": Absorbing, "uniform": Uniform}
    if kind not in graphs:
        raise ValueError(f"graph.type={kind!r} is not a valid graph; choose one of {sorted(graphs)}.")
    return graphs[kind](config["tokens"])


def unsqueeze_as(x: torch.Tensor, y: torch.Tensor, back: bool = True) -> torch.Tensor:
    """View `x` with trailing (or leading) singleton dims so that it has as many dims as `y`."""
    extra = (1,) * (y.dim() - x.dim())
    return x.view(*x.shape, *extra) if back else x.view(*extra, *x.shape)


def expm1_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """e^sigma - 1, accurate for small sigma."""
    return torch.expm1(sigma)


def bregman_exp(u: torch.Tensor) -> torch.Tensor:
    """f(u) = e^u - u - 1 >= 0, written with expm1 so small u keeps its precision."""
    return torch.expm1(u) - u


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample indices from unnormalised non-negative `probs` [..., V] by the Gumbel-max trick.

    Entries <= 0 are never chosen (as in the original `catsample.sample_categorical`).
    """
    noise = torch.rand(probs.shape, device=probs.device, dtype=probs.dtype, generator=generator)
    noise.add_(1e-10).log_().neg_().add_(1e-10)  # 1e-10 - log(u + 1e-10) ~ Exp(1), in one buffer
    return torch.div(probs, noise, out=noise).argmax(dim=-1)


class Graph(abc.ABC):
    """A CTMC rate matrix over `dim` states."""

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Number of states (the model's output width)."""

    @property
    @abc.abstractmethod
    def absorb(self) -> bool:
        """Whether state `dim - 1` is an absorbing mask state."""

    @abc.abstractmethod
    def rate(self, i: torch.Tensor) -> torch.Tensor:
        """Column i of Q: forward rates out of state i, [..., dim]."""

    @abc.abstractmethod
    def transp_rate(self, i: torch.Tensor) -> torch.Tensor:
        """Row i of Q, [..., dim]: used for the reverse rate."""

    @abc.abstractmethod
    def transition(self, i: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Column i of exp(sigma Q): p(x_t = . | x_0 = i), [..., dim]."""

    @abc.abstractmethod
    def transp_transition(self, i: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Row i of exp(sigma Q): p(x_t = i | x_0 = .), [..., dim]."""

    @abc.abstractmethod
    def sample_transition(self, i: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ p(. | x_0 = i) with total noise sigma (broadcast against i)."""

    @abc.abstractmethod
    def staggered_score(self, score: torch.Tensor, dsigma: torch.Tensor) -> torch.Tensor:
        """exp(-dsigma Q) applied to the (exponentiated) score: the Tweedie step of the analytic sampler."""

    @abc.abstractmethod
    def sample_limit(self, *batch_dims: int) -> torch.Tensor:
        """Sample the t = 1 limiting distribution, shape `batch_dims`."""

    @abc.abstractmethod
    def score_entropy(
        self, score: torch.Tensor, sigma: torch.Tensor, x: torch.Tensor, x0: torch.Tensor
    ) -> torch.Tensor:
        """Denoising score entropy at each position (paper Eq. 8), [...] in nats (before the dsigma weight)."""

    def reverse_rate(self, i: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Reverse rate Q^T(i, y) s_y with the diagonal set so that rows sum to zero, [..., dim]."""
        normalized_rate = self.transp_rate(i) * score
        normalized_rate.scatter_(-1, i[..., None], torch.zeros_like(normalized_rate))
        normalized_rate.scatter_(-1, i[..., None], -normalized_rate.sum(dim=-1, keepdim=True))
        return normalized_rate

    def sample_rate(self, i: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
        """One Euler step: sample from onehot(i) + rate."""
        return sample_categorical(F.one_hot(i, num_classes=self.dim).to(rate) + rate)


class Uniform(Graph):
    """Q = (1/dim) 11^T - I: every token jumps to any token, normalised by dim."""

    def __init__(self, dim: int):
        self._dim = dim

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def absorb(self) -> bool:
        return False

    def rate(self, i: torch.Tensor) -> torch.Tensor:
        edge = torch.full((*i.shape, self.dim), 1 / self.dim, device=i.device)
        return edge.scatter(-1, i[..., None], -(self.dim - 1) / self.dim)

    def transp_rate(self, i: torch.Tensor) -> torch.Tensor:
        return self.rate(i)

    def transition(self, i: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        move = -torch.expm1(-sigma[..., None])  # 1 - e^{-sigma}
        trans = move.expand(*i.shape, self.dim) / self.dim
        trans = trans.scatter(-1, i[..., None], torch.zeros_like(trans))
        return trans.scatter(-1, i[..., None], 1 - trans.sum(dim=-1, keepdim=True))

    def transp_transition(self, i: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.transition(i, sigma)

    def sample_transition(self, i: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        move_chance = -torch.expm1(-sigma)
        move = torch.rand(*i.shape, device=i.device) < move_chance
        return torch.where(move, torch.randint_like(i, self.dim), i)

    def staggered_score(self, score: torch.Tensor, dsigma: torch.Tensor) -> torch.Tensor:
        dim = score.shape[-1]
        epow = (-dsigma).exp()[..., None]
        return ((epow - 1) / (dim * epow)) * score.sum(dim=-1, keepdim=True) + score / epow

    def sample_limit(self, *batch_dims: int) -> torch.Tensor:
        return torch.randint(0, self.dim, batch_dims)

    def score_entropy(
        self, score: torch.Tensor, sigma: torch.Tensor, x: torch.Tensor, x0: torch.Tensor
    ) -> torch.Tensor:
        """Uniform-graph score entropy. With esigm1 = e^sigma - 1 the true ratios are

        x == x0:  r_y = ratio = esigm1 / (esigm1 + dim) for every y != x;
        x != x0:  r_{x0} = 1 / ratio, r_y = 1 otherwise.

        `ratio` is written as esigm1 / (esigm1 + dim): the original `1 - dim / (esigm1 + dim)` rounds to 0
        in float32 for small sigma and turns the loss into NaN.
        """
        esigm1 = expm1_sigma(sigma).expand_as(x).to(score.dtype)
        log_ratio = esigm1.log() - torch.log(esigm1 + self.dim)
        same = x == x0
        # per-entry log r_y for every y; entry y = x is dropped below
        log_r = torch.where(same, log_ratio, torch.zeros_like(log_ratio))[..., None].expand_as(score)
        log_r = log_r.scatter(-1, x0[..., None], torch.where(same, log_ratio, -log_ratio)[..., None])
        per_entry = log_r.exp() * bregman_exp(score - log_r)
        per_entry = per_entry.scatter(-1, x[..., None], torch.zeros_like(per_entry[..., :1]))
        return per_entry.sum(dim=-1) / self.dim


class Absorbing(Graph):
    """Q = e_mask 1^T - I over `tokens` real tokens plus a mask state at index `tokens` (= dim - 1): every token
    jumps to the mask at rate 1."""

    def __init__(self, dim: int):
        super().__init__()
        self._dim = dim

    @property
    def dim(self) -> int:
        return self._dim + 1

    @property
    def absorb(self) -> bool:
        return True

    @property
    def mask_index(self) -> int:
        return self.dim - 1

    def rate(self, i: torch.Tensor) -> torch.Tensor:
        mask = torch.full_like(i, self.mask_index)
        return F.one_hot(mask, num_classes=self.dim) - F.one_hot(i, num_classes=self.dim)

    def transp_rate(self, i: torch.Tensor) -> torch.Tensor:
        edge = -F.one_hot(i, num_classes=self.dim)
        edge[i == self.mask_index] += 1
        return edge

    def transition(self, i: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        stay = (-unsqueeze_as(sigma, i[..., None])).exp()
        edge = stay * F.one_hot(i, num_classes=self.dim)
        edge[..., self.mask_index] += (1 - stay).expand_as(edge[..., 0:1]).squeeze(-1)
        return edge

    def transp_transition(self, i: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = unsqueeze_as(sigma, i[..., None])
        edge = (-sigma).exp() * F.one_hot(i, num_classes=self.dim)
        edge += torch.where(i == self.mask_index, -torch.expm1(-sigma).squeeze(-1), 0)[..., None]
        return edge

    def sample_transition(self, i: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        move_chance = -torch.expm1(-sigma)
        move = torch.rand(*i.shape, device=i.device) < move_chance
        return torch.where(move, self.mask_index, i)

    def staggered_score(self, score: torch.Tensor, dsigma: torch.Tensor) -> torch.Tensor:
        extra_const = -torch.expm1(dsigma) * score.sum(dim=-1)  # (1 - e^{dsigma}) sum_y s_y
        score = score * dsigma.exp()[..., None]
        score[..., -1] += extra_const
        return score

    def sample_limit(self, *batch_dims: int) -> torch.Tensor:
        return torch.full(batch_dims, self.mask_index, dtype=torch.int64)

    def score_entropy(
        self, score: torch.Tensor, sigma: torch.Tensor, x: torch.Tensor, x0: torch.Tensor
    ) -> torch.Tensor:
        """Absorbing score entropy: nonzero only where x is the mask, where the only nonzero true ratio is
        r_{x0} = 1 / esigm1, so the value is  sum_{y != mask, x0} s_y + r f(log s_{x0} + log esigm1).
        """
        masked = x == self.mask_index
        # keep unmasked rows finite so that their (discarded) branch cannot leak NaN gradients
        score = torch.where(masked[..., None], score, torch.zeros_like(score))
        log_esigm1 = expm1_sigma(sigma).expand_as(x).to(score.dtype).log()
        score_x0 = torch.gather(score, -1, x0[..., None]).squeeze(-1)
        without_x0 = score[..., :-1].scatter(-1, x0[..., None].clamp(max=self.dim - 2), float("-inf"))
        others = without_x0.exp().sum(dim=-1)
        entropy = others + (-log_esigm1).exp() * bregman_exp(score_x0 + log_esigm1)
        return torch.where(masked, entropy, torch.zeros_like(entropy))
