"""Rejection-sampling fine-tuning (ReFT; RFT of Yuan et al., 2023; expert iteration / ReST): sample k answers
per prompt from the policy, score them, keep the good ones and fine-tune on them with the SFT loss, repeat.

Selection (`select_reft`), per prompt (group of G completions):
  * `best`:      the highest-reward completion (the first on ties), kept when its reward >= `threshold`
                 (`threshold=null`: always kept);
  * `threshold`: every completion with reward >= `threshold`, identical completions once (`dedupe`), the
                 best `max_per_prompt` of them when set.
Kept completions get weight 1, so the update is exactly the SFT update on them (`rl.buffer`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from rl.buffer import Selection

SELECTIONS = ("best", "threshold")


def select_reft(
    rewards: Sequence[float],
    group_size: int,
    *,
    selection: str = "best",
    threshold: float | None = 1.0,
    max_per_prompt: int | None = None,
    keys: Sequence[Hashable] | None = None,
) -> Selection:
    """The rows to fine-tune on among B x G rewards (prompt-major: row b * G + g), with weight 1 each.

    `keys[i]` (e.g. the completion's tokens) identifies duplicates for `threshold` selection; None keeps them.
    Metrics: `acceptance` (kept / all completions), `prompts_kept` (share of prompts with a kept completion)
    and `kept_reward_mean`.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"rl.method.selection={selection!r} is not valid; choose one of {SELECTIONS}.")
    if selection == "threshold" and threshold is None:
        raise ValueError(
            "rl.method.selection=threshold needs rl.method.threshold (e.g. 1.0 for correct answers)."
        )
    n = len(rewards)
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} rewards do not form groups of k={group_size} completions per prompt.")
    rows: list[int] = []
    for start in range(0, n, group_size):
        group = list(range(start, start + group_size))
        ranked = sorted(group, key=lambda i: -rewards[i])  # stable: the first completion wins ties
        if selection == "best":
            best = ranked[0]
            if threshold is None or rewards[best] >= threshold:
                rows.append(best)
            continue
        seen: set[Hashable] = set()
        kept = []
        for i in ranked:
            if rewards[i] < threshold:
                break
            if keys is not None:
                if keys[i] in seen:
                    continue
                seen.add(keys[i])
            kept.append(i)
        rows.extend(sorted(kept[:max_per_prompt] if max_per_prompt else kept))
    groups_kept = len({r // group_size for r in rows})
    metrics = {
        "acceptance": len(rows) / max(n, 1),
        "prompts_kept": groups_kept / max(n // group_size, 1),
    }
    if rows:
        metrics["kept_reward_mean"] = sum(rewards[r] for r in rows) / len(rows)
    return Selection(rows, [1.0] * len(rows), metrics)


@dataclass
class ReFT:
    """Rejection-sampling fine-tuning: see the module docstring. Configured by configs/rl/method/reft.yaml."""

    selection: str = "best"
    threshold: float | None = 1.0
    max_per_prompt: int | None = None
    dedupe: bool = True

    name: ClassVar[str] = "reft"
    min_group_size: ClassVar[int] = 1
    offline = None  # ReFT always samples from the policy

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(
                f"rl.method.selection={self.selection!r} is not valid; choose one of {SELECTIONS}."
            )
        if self.selection == "threshold" and self.threshold is None:
            raise ValueError("rl.method.selection=threshold needs rl.method.threshold (e.g. 1.0).")
        if self.max_per_prompt is not None and self.max_per_prompt < 1:
            raise ValueError(
                f"rl.method.max_per_prompt={self.max_per_prompt} must be >= 1 (or null for no limit)."
            )

    def select(
        self,
        rewards: Sequence[float],
        group_size: int,
        groups: Sequence[int] | None = None,
        keys: Sequence[Hashable] | None = None,
        kl: Sequence[float] | None = None,
    ) -> Selection:
        """`select_reft` with this configuration (`groups` and `kl` are not used: groups are the fixed k)."""
        return select_reft(
            rewards,
            group_size,
            selection=self.selection,
            threshold=self.threshold,
            max_per_prompt=self.max_per_prompt,
            keys=keys if self.dedupe else None,
        )
