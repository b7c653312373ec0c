"""Reward-weighted denoising (RWD): the SFT loss (DWDSE) of each sampled completion, weighted by its reward.

Reward-weighted regression (Peters & Schaal, 2007; AWR, Peng et al., 2019) for a diffusion language model: the
policy is fitted to its own samples reweighted toward high reward, the M-step of

    pi_new(x) ∝ pi_old(x) exp(A(x) / beta),

the maximiser of E[A] - beta KL(pi || pi_old), so `beta` is the KL temperature of each iteration (small beta:
close to keeping the best only, as ReFT; large beta: close to SFT on all samples). The loss of one update is
`sum_i w_i DWDSE(x_i) / sum_i n_scored(x_i)` (`rl.buffer.weighted_batch_loss`).

Weights (`reward_weights`), per group of completions of one prompt (or the whole batch, `normalize=batch`):
  * `exp` (default): w_i = min(exp(A_i / beta), max_weight), A_i = (r_i - mean r) / (std r + 1e-6) the
    group-normalised advantage. Not renormalised: an average completion gets 1, equal rewards give 1 each.
  * `softmax`:       w_i = G * softmax(r / beta)_i over the group of G, so each group's weights sum to G
    (mean 1; equal rewards give 1 each); then capped at `max_weight` (a capped group sums to less than G).
A group whose rewards are all equal says nothing about what is better: its weights are uniform (1 each),
and training on it only sharpens the policy around its own samples (self-distillation), which on a sparse
reward (all k answers wrong) is most of the data. `skip_uniform` (default) leaves such groups out, as DAPO's
dynamic sampling and rl/pg.py do; `skip_uniform=False` keeps them (plain reward-weighted regression).
How the weights reach the loss (`batching`). `weight`: each completion's DWDSE is multiplied by its weight.
But one update sees a minibatch, and a minibatch that happens to hold only low-weight completions still moves
the policy toward them at full step size (Adam rescales every step), which on a continuous reward can undo
the previous update. `resample` (default): the N completions are redrawn in proportion to their weights
(`systematic_resample`, deterministic), each copy with weight 1, so every minibatch is a sample of the
reweighted distribution pi_old exp(A / beta) and the weighted objective holds per minibatch, in expectation.
Optional KL control to the starting model: the reward is shaped as r_i - kl_coef * KL_hat_i, KL_hat_i the
per-completion ELBO estimate of log pi(x_i) - log ref(x_i) (`rl.kl`) in nats.

Offline: `offline.dataset` names a dataset of (prompt, completion, reward) rows, trained on instead of
samples (grouped by prompt for the normalisation).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from rl.buffer import Selection, encode_completions, group_ids, make_example, uniform_groups

WEIGHTINGS = ("exp", "softmax")
NORMALIZATIONS = ("group", "batch")
BATCHINGS = ("resample", "weight")


def reward_weights(
    rewards: torch.Tensor | Sequence[float],
    groups: torch.Tensor | Sequence[int],
    *,
    weighting: str = "exp",
    beta: float = 0.5,
    max_weight: float = 20.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Weights [N] of N completions with rewards [N] in groups [N] (ids of their prompts); see the module
    docstring for the two schemes. Groups may have different sizes."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"rl.method.weighting={weighting!r} is not valid; choose one of {WEIGHTINGS}.")
    if beta <= 0:
        raise ValueError(f"rl.method.beta={beta} must be > 0 (the KL temperature; smaller is greedier).")
    if max_weight <= 0:
        raise ValueError(f"rl.method.max_weight={max_weight} must be > 0.")
    r = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    g = torch.as_tensor(groups, dtype=torch.long).reshape(-1)
    if r.shape != g.shape:
        raise ValueError(f"{r.numel()} rewards but {g.numel()} group ids; give one group id per reward.")
    weights = torch.empty_like(r)
    for group in torch.unique(g):
        at = g == group
        x = r[at]
        if weighting == "exp":
            advantage = (x - x.mean()) / (x.std(unbiased=False) + eps)
            weights[at] = torch.exp(advantage / beta)
        else:
            weights[at] = x.numel() * torch.softmax(x / beta, dim=0)
    return weights.clamp(max=max_weight).float()


def systematic_resample(weights: torch.Tensor, n: int) -> torch.Tensor:
    """Indices [n] drawn in proportion to `weights` [N] (>= 0, not all 0) by systematic resampling with the
    fixed offset 1/2: index i appears round(C_i) - round(C_{i-1}) times, C_i = n * sum_{j<=i} w_j / sum w, so
    its count is within 1 of n w_i / sum w. Deterministic (no random draw), in index order."""
    if n < 0 or weights.numel() == 0 or not bool(weights.sum() > 0) or bool((weights < 0).any()):
        raise ValueError("systematic_resample needs n >= 0 and non-negative weights with a positive sum.")
    edges = torch.floor(torch.cumsum(weights.double(), 0) / weights.double().sum() * n + 0.5).long()
    counts = torch.diff(edges, prepend=edges.new_zeros(1))
    return torch.repeat_interleave(torch.arange(weights.numel()), counts)


@dataclass
class OfflineData:
    """Where an offline dataset of scored completions lives and which columns hold what."""

    dataset: str | None = None
    split: str = "train"
    prompt_field: str = "prompt"  # the question, rendered in the prompt template like the RL prompts
    completion_field: str = "completion"
    reward_field: str = "reward"


def offline_options(value: Any, cls: type) -> Any:
    """A method's `offline` option (a config mapping, a `cls` or None) as a `cls`, or None when it names no
    dataset (online samples)."""
    if value is not None and not isinstance(value, cls):
        value = cls(**dict(value))
    return value if value is not None and value.dataset is not None else None


@dataclass
class OfflineGroups:
    """Tokenized offline rows grouped by prompt: `groups[j]` lists (example, reward, completion text) of the
    j-th distinct prompt, `questions[j]` its text."""

    groups: list[list[tuple[dict[str, Any], float, str]]]
    questions: list[str]

    def __len__(self) -> int:
        return len(self.groups)


def load_offline(offline: OfflineData, tokenizer, template: str | None, max_length: int) -> OfflineGroups:
    """Read, tokenize (as SFT data: prompt tokens, then ` completion` and EOS) and group an offline dataset;
    rows over `max_length` tokens are dropped, non-finite rewards raise."""
    import data

    splits = data.load_raw_dataset(offline.dataset)
    if offline.split not in splits:
        raise ValueError(
            f"{offline.dataset} has splits {list(splits)}; set rl.method.offline.split to one of them."
        )
    rows = splits[offline.split]
    for role, col in (
        ("prompt", offline.prompt_field),
        ("completion", offline.completion_field),
        ("reward", offline.reward_field),
    ):
        if col not in rows.column_names:
            raise ValueError(
                f"The offline dataset has no {role} column {col!r} (columns: {rows.column_names}); set "
                f"rl.method.offline.{role}_field."
            )
    questions = [str(q) for q in rows[offline.prompt_field]]
    texts = [str(c) for c in rows[offline.completion_field]]
    prompts, completions = encode_completions(tokenizer, questions, texts, template)
    eos = tokenizer.eos_token_id
    by_question: dict[str, list[tuple[dict[str, Any], float, str]]] = {}
    for i, (q, p, c, text) in enumerate(zip(questions, prompts, completions, texts, strict=True)):
        reward = float(rows[i][offline.reward_field])
        if not math.isfinite(reward):
            raise ValueError(f"Offline row {i} has a non-finite reward {reward}.")
        if len(p) + len(c) + 1 > max_length:
            continue
        by_question.setdefault(q, []).append((make_example(p, c, True, eos), reward, text))
    if not by_question:
        raise ValueError(f"No offline row fits in max_length={max_length} tokens; raise rl.max_length.")
    return OfflineGroups(list(by_question.values()), list(by_question))


@dataclass
class RewardWeighted:
    """Reward-weighted denoising: see the module docstring. Configured by configs/rl/method/rwd.yaml."""

    weighting: str = "exp"
    beta: float = 0.5
    max_weight: float = 20.0
    normalize: str = "group"
    skip_uniform: bool = True
    batching: str = "resample"
    kl_coef: float = 0.0
    offline: OfflineData | dict | None = field(default=None)

    name: ClassVar[str] = "rwd"

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(
                f"rl.method.weighting={self.weighting!r} is not valid; choose one of {WEIGHTINGS}."
            )
        if self.batching not in BATCHINGS:
            raise ValueError(f"rl.method.batching={self.batching!r} is not valid; choose one of {BATCHINGS}.")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(
                f"rl.method.normalize={self.normalize!r} is not valid; choose one of {NORMALIZATIONS}."
            )
        if self.beta <= 0 or self.max_weight <= 0 or self.kl_coef < 0:
            raise ValueError(
                f"rl.method.beta={self.beta} and max_weight={self.max_weight} must be > 0, kl_coef={self.kl_coef} >= 0."
            )
        self.offline = offline_options(self.offline, OfflineData)

    @property
    def min_group_size(self) -> int:
        """rl.k needed: 2 to normalise within groups, 1 over the batch (one completion per prompt)."""
        return 2 if self.normalize == "group" else 1

    def select(
        self,
        rewards: Sequence[float],
        group_size: int,
        groups: Sequence[int] | None = None,
        keys: Sequence[Hashable] | None = None,
        kl: Sequence[float] | None = None,
    ) -> Selection:
        """Every completion, weighted; with `skip_uniform`, not those of groups whose (shaped) rewards are all
        equal. `groups` [N] defaults to consecutive groups of `group_size`; `kl` [N] (per-completion KL
        estimates, nats) shapes the rewards when `kl_coef > 0`."""
        n = len(rewards)
        r = torch.tensor([float(x) for x in rewards], dtype=torch.float64)
        if self.kl_coef > 0 and kl is not None:
            r = r - self.kl_coef * torch.tensor([float(x) for x in kl], dtype=torch.float64)
        g = group_ids(n, group_size, groups, self.normalize)
        w = reward_weights(r, g, weighting=self.weighting, beta=self.beta, max_weight=self.max_weight)
        uniform = uniform_groups(r, g)
        rows = [i for i in range(n) if not (self.skip_uniform and int(g[i]) in uniform)]
        w = w[rows]
        n = len(rows)
        metrics = {
            "weight_mean": float(w.mean()) if n else 0.0,
            "weight_max": float(w.max()) if n else 0.0,
            "weight_capped": float((w >= self.max_weight).float().mean()) if n else 0.0,
            # effective sample size over N: 1 for equal weights, 1/N when one completion takes all
            "weight_ess": float(w.sum() ** 2 / (w.pow(2).sum() * n)) if n else 0.0,
            "acceptance": n / max(len(rewards), 1),
        }
        if self.batching == "weight" or not rows:
            return Selection(rows, w.tolist(), metrics)
        drawn = systematic_resample(w, n)
        metrics["resampled_unique"] = len(set(drawn.tolist())) / max(n, 1)
        return Selection([rows[i] for i in drawn.tolist()], [1.0] * n, metrics)
