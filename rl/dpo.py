"""Diffusion DPO (Rafailov et al., 2023, with the likelihoods of a diffusion model: Wallace et al., 2023;
VRPO of LLaDA 1.5, Zhu et al., 2025): fit the policy to preference pairs (x, y_w, y_l) without a reward model,

    loss = -log sigmoid(beta * [(l_theta(y_w) - l_ref(y_w)) - (l_theta(y_l) - l_ref(y_l))])

with l an ELBO estimate of log p(y | x) (rl/estimators.py, `n_mc` draws; by default `elbo_normalized`, whose
gradient cannot push the rejected completion down by inflating the score's mass, which in the demo cut the
fall of the chosen completions' own likelihood from ~280 to ~36 nats) and ref the frozen starting model.
Variance reduction as VRPO: the same (t, x_t) draws for the policy and the reference and for both
completions of a pair (the noise is keyed by the pair's id), so the four estimates share their noise and the
difference inside the sigmoid keeps little of it. `beta * (l_theta - l_ref)` is each completion's implicit
reward; logged as `reward_chosen`, `reward_rejected`, their `reward_margin`, and `pref_accuracy` (share of
pairs with a positive margin).

Pairs: offline, a dataset of (prompt, chosen, rejected) rows (`offline.*_field` name the columns; held-out
pairs of `offline.eval_split` are scored at every evaluation); or online, the best and the worst of each
prompt's k sampled completions by reward (prompts whose completions all score the same give no pair).
An update's loss is the mean over its pairs weighted by their scored tokens (`training.train_step`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from losses import LossTerms
from rl.buffer import Selection, encode_completions, group_ids, make_example
from rl.estimators import LikelihoodMethod, Scorer, scored_mask, sequence_terms
from rl.rwd import OfflineGroups, offline_options

EVAL_ID_BASE = 2**40  # noise ids of held-out pairs: the same draws at every evaluation


def dpo_loss(
    logp_chosen: torch.Tensor,
    logp_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss [P] of P pairs from their log-likelihood estimates [P] under the policy and the reference,
    with the implicit rewards beta * (l_theta - l_ref) of the chosen and rejected completions [P]."""
    reward_chosen = beta * (logp_chosen - ref_chosen)
    reward_rejected = beta * (logp_rejected - ref_rejected)
    return -F.logsigmoid(reward_chosen - reward_rejected), reward_chosen, reward_rejected


def select_pairs(rewards: Sequence[float], group_size: int, groups: Sequence[int] | None = None) -> Selection:
    """The best and the worst completion of each group (first best, last worst on ties) when their rewards
    differ, as consecutive rows (chosen, rejected) with weights (+1, -1). `groups` [N] (ids) defaults to
    consecutive groups of `group_size` (prompt-major rollouts)."""
    n = len(rewards)
    if groups is None and (group_size < 1 or n % group_size):
        raise ValueError(f"{n} rewards do not form groups of k={group_size} completions per prompt.")
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids(n, group_size, groups).tolist()):
        members.setdefault(g, []).append(i)
    rows: list[int] = []
    gaps: list[float] = []
    for group in members.values():
        best = max(group, key=lambda i: (rewards[i], -i))
        worst = min(group, key=lambda i: (rewards[i], -i))
        if rewards[best] > rewards[worst]:
            rows += [best, worst]
            gaps.append(rewards[best] - rewards[worst])
    metrics = {"acceptance": len(rows) / max(n, 1), "prompts_paired": len(gaps) / max(len(members), 1)}
    if gaps:
        metrics["pair_reward_gap"] = sum(gaps) / len(gaps)
    return Selection(rows, [1.0, -1.0] * len(gaps), metrics)


@dataclass
class PreferenceData:
    """Where an offline preference dataset lives and which columns hold what."""

    dataset: str | None = None
    split: str = "train"
    eval_split: str | None = None  # held-out pairs, scored at every evaluation (null: none)
    eval_pairs: int = 256  # the first N pairs of eval_split
    prompt_field: str = "prompt"  # the question, rendered in the prompt template like the RL prompts
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"


def load_preferences(
    prefs: PreferenceData,
    tokenizer,
    template: str | None,
    max_length: int,
    split: str,
    limit: int | None = None,
) -> OfflineGroups:
    """Tokenized preference pairs of `split` (its first `limit` rows) as two-row groups [(chosen, 1.0, text),
    (rejected, 0.0, text)] (SFT examples: prompt, completion, EOS); pairs over `max_length` are dropped."""
    import data

    splits = data.load_raw_dataset(prefs.dataset)
    if split not in splits:
        raise ValueError(
            f"{prefs.dataset} has splits {list(splits)}, not {split!r}; set rl.method.offline.split "
            "(and eval_split) to one of them."
        )
    rows = splits[split]
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    for role in ("prompt", "chosen", "rejected"):
        column = getattr(prefs, f"{role}_field")
        if column not in rows.column_names:
            raise ValueError(
                f"The preference dataset has no {role} column {column!r} (columns: {rows.column_names}); set "
                f"rl.method.offline.{role}_field."
            )
    questions = [str(q) for q in rows[prefs.prompt_field]]
    texts = {role: [str(c) for c in rows[getattr(prefs, f"{role}_field")]] for role in ("chosen", "rejected")}
    prompts, chosen = encode_completions(tokenizer, questions, texts["chosen"], template)
    _, rejected = encode_completions(tokenizer, questions, texts["rejected"], template)
    eos = tokenizer.eos_token_id
    groups, kept = [], []
    for i, (p, good, bad) in enumerate(zip(prompts, chosen, rejected, strict=True)):
        if len(p) + max(len(good), len(bad)) + 1 <= max_length:
            groups.append(
                [
                    (make_example(p, good, True, eos), 1.0, texts["chosen"][i]),
                    (make_example(p, bad, True, eos), 0.0, texts["rejected"][i]),
                ]
            )
            kept.append(questions[i])
    if not groups:
        raise ValueError(f"No preference pair fits in max_length={max_length} tokens; raise rl.max_length.")
    return OfflineGroups(groups, kept)


@dataclass
class DPO(LikelihoodMethod):
    """Diffusion DPO: see the module docstring. Configured by configs/rl/method/dpo.yaml."""

    beta: float = 0.1
    offline: PreferenceData | dict | None = field(default=None)

    name: ClassVar[str] = "dpo"
    min_group_size: ClassVar[int] = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"rl.method.beta={self.beta} must be > 0 (the DPO temperature).")
        self.offline = offline_options(self.offline, PreferenceData)

    def select(
        self,
        rewards: Sequence[float],
        group_size: int,
        groups: Sequence[int] | None = None,
        keys: Sequence[Hashable] | None = None,
        kl: Sequence[float] | None = None,
    ) -> Selection:
        """`select_pairs`: chosen/rejected rows, consecutive (`keys` and `kl` are not used)."""
        return select_pairs(rewards, group_size, groups)

    def load_offline(self, tokenizer, template: str | None, max_length: int) -> OfflineGroups:
        """The training pairs (`offline.split`) as `OfflineGroups` of two rows each."""
        return load_preferences(self.offline, tokenizer, template, max_length, self.offline.split)

    def load_eval(
        self, tokenizer, template: str | None, max_length: int, scorer: Scorer
    ) -> list[dict[str, Any]] | None:
        """The held-out pairs (first `offline.eval_pairs` of `offline.eval_split`), prepared once (their
        reference log-likelihoods under fixed noise ids), or None without them."""
        if self.offline is None or self.offline.eval_split is None:
            return None
        prefs = self.offline
        pairs = load_preferences(prefs, tokenizer, template, max_length, prefs.eval_split, prefs.eval_pairs)
        examples = [example for group in pairs.groups for example, _, _ in group]
        return self.prepare(examples, scorer.reference, scorer, EVAL_ID_BASE)

    def prepare(
        self, examples: list[dict[str, Any]], policy: nn.Module, scorer: Scorer, id_base: int
    ) -> list[dict[str, Any]]:
        """Selected rows (chosen, rejected, chosen, ...) as pairs with their reference log-likelihoods,
        estimated under the pair's noise (id `id_base + j`); `policy` is not needed."""
        chosen, rejected = examples[0::2], examples[1::2]
        ids = [id_base + j for j in range(len(chosen))]
        ref = scorer.score(scorer.reference, chosen + rejected, ids + ids).tolist()
        n = len(chosen)
        return [
            {"chosen": good, "rejected": bad, "id": i, "ref_chosen": ref[j], "ref_rejected": ref[n + j]}
            for j, (good, bad, i) in enumerate(zip(chosen, rejected, ids, strict=True))
        ]

    def collate(self, pairs: Sequence[dict[str, Any]], scorer: Scorer) -> dict[str, torch.Tensor]:
        """P pairs as one batch of 2P rows, the chosen completions first; `ref_logp` [2P]."""
        ids = [p["id"] for p in pairs]
        batch = scorer.collate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], ids + ids)
        ref = [p["ref_chosen"] for p in pairs] + [p["ref_rejected"] for p in pairs]
        batch["ref_logp"] = torch.tensor(ref, dtype=torch.float32, device=batch["input_ids"].device)
        return batch

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], scorer: Scorer
    ) -> tuple[LossTerms, dict[str, float]]:
        """The DPO loss of a collated batch of pairs (per pair, weighted by its scored tokens) plus `mass_coef`
        times both completions' score-mass terms (elbo_normalized), and its metrics."""
        logp, mass = scorer.log_prob_and_mass(model, batch)
        chosen, rejected = logp.float().chunk(2)
        ref_chosen, ref_rejected = batch["ref_logp"].chunk(2)
        loss, reward_chosen, reward_rejected = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        n_tokens = scored_mask(batch).sum(dim=1)
        n_pair = n_tokens.view(2, -1).sum(dim=0)
        per_pair = loss * n_pair + self.mass_coef * mass.view(2, -1).sum(dim=0)
        metrics = preference_metrics(loss, reward_chosen, reward_rejected)
        metrics["score_mass"] = float(mass.detach().sum() / n_tokens.sum().clamp(min=1))
        return sequence_terms(per_pair, n_pair), metrics

    @torch.no_grad()
    def evaluate(self, policy: nn.Module, pairs: list[dict[str, Any]], scorer: Scorer) -> dict[str, float]:
        """Held-out pairs (`load_eval`) under the policy (in eval mode): the DPO loss, implicit reward margin
        and `pref_accuracy`, and `likelihood_accuracy`, the share of pairs whose chosen completion has the
        higher estimated log-likelihood under the policy itself."""
        ids = [p["id"] for p in pairs]
        examples = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
        chosen, rejected = scorer.score(policy, examples, ids + ids).chunk(2)
        ref_chosen = torch.tensor([p["ref_chosen"] for p in pairs])
        ref_rejected = torch.tensor([p["ref_rejected"] for p in pairs])
        loss, reward_chosen, reward_rejected = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        metrics = preference_metrics(loss, reward_chosen, reward_rejected)
        metrics["likelihood_accuracy"] = float((chosen > rejected).float().mean())
        return {f"heldout_{k}": v for k, v in metrics.items()}


def preference_metrics(
    loss: torch.Tensor, reward_chosen: torch.Tensor, reward_rejected: torch.Tensor
) -> dict[str, float]:
    """Mean DPO loss, implicit rewards, margin and preference accuracy of a batch of pairs."""
    margin = (reward_chosen - reward_rejected).detach()
    return {
        "dpo_loss": float(loss.detach().mean()),
        "reward_chosen": float(reward_chosen.detach().mean()),
        "reward_rejected": float(reward_rejected.detach().mean()),
        "reward_margin": float(margin.mean()),
        "pref_accuracy": float((margin > 0).float().mean()),
    }
