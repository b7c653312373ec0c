"""Weighted SFT examples built from scored completions: selection result, collation in the starting model's
SFT layout, the minibatch stream of one iteration, and the weighted SFT loss.

An example is `{"input_ids": prompt + completion (+ EOS when it finished), "prompt_len": int, "weight": float}`,
exactly what `data.tokenize_sft_dataset` produces for a (question, answer) pair, so the policy is trained on
its own samples with the SFT recipe's loss: the prompt is clean and conditions the model, the completion (and
its EOS, and with `pad_with_eos` the EOS fill up to `max_length`) is noised and scored.

The RL objective of one update is the weighted DWDSE over the global batch, normalised by its scored tokens
as `training.train_step` does (weights 1 give exactly the SFT loss):

    loss = sum_i w_i * DWDSE(x_i) / sum_i n_scored(x_i)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import data
import utils
from graph_lib import Graph
from losses import LossTerms
from noise_lib import Noise
from training import batch_loss, example_noise, to_device


def fill_with_eos(batch: dict[str, torch.Tensor], eos_id: int) -> dict[str, torch.Tensor]:
    """sft.py's EOS-fill convention (LLaDA-style): padding becomes EOS tokens that are attended to and scored
    as part of the response. Imported lazily: sft.py is an entrypoint."""
    from sft import fill_with_eos as sft_fill_with_eos

    return sft_fill_with_eos(batch, eos_id)


def make_example(
    prompt: Sequence[int], completion: Sequence[int], finished: bool, eos_id: int, weight: float = 1.0
) -> dict[str, Any]:
    """One SFT example: prompt + completion, and the EOS that ended the completion when it finished (an
    unfinished completion was cut by the canvas, so it gets no EOS, as a truncated SFT response)."""
    ids = [int(t) for t in prompt] + [int(t) for t in completion] + ([eos_id] if finished else [])
    return {"input_ids": ids, "prompt_len": len(prompt), "weight": float(weight)}


def encode_completions(
    tokenizer, questions: Sequence[str], completions: Sequence[str], template: str | None
) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt and completion token ids of (question, completion) text pairs, tokenized as SFT data: the
    question rendered in `template`, the completion as it follows the prompt (`data.join_response`)."""
    from generation import encode_prompts

    prompts = encode_prompts(tokenizer, questions, template)
    rendered = [data.PromptTemplate(prompt=template).render_prompt(q) if template else q for q in questions]
    joined = [data.join_response(p, c) for p, c in zip(rendered, completions, strict=True)]
    return prompts, tokenizer(joined, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def collate(examples: Sequence[dict[str, Any]], eos_id: int, pad_to: int | None) -> dict[str, torch.Tensor]:
    """Examples as an SFT batch: `input_ids`, `attention_mask`, `loss_mask` [B, L], `prompt_len` [B] and
    `weight` [B] (1 when absent). With `pad_to` (the starting model's `pad_with_eos`) rows are EOS-filled to
    `pad_to` tokens as in sft.py; otherwise right-padded with EOS and the padding is masked out."""
    batch = data.sft_collate(list(examples), pad_id=eos_id, pad_to=pad_to)
    if pad_to is not None:
        batch = fill_with_eos(batch, eos_id)
    batch["weight"] = torch.tensor([float(ex.get("weight", 1.0)) for ex in examples], dtype=torch.float32)
    return batch


def weighted_batch_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], graph: Graph, noise: Noise, sampling_eps: float = 1e-3
) -> LossTerms:
    """DWDSE of a collated batch under its `draws`, each sequence's term multiplied by its `weight` [B].

    `per_sequence` [B] becomes w_i * DWDSE(x_i); `train_step` sums it over the global batch and divides by the
    scored tokens, so the update is that of `sum_i w_i DWDSE_i / sum_i n_i`.
    """
    terms = batch_loss(model, batch, graph, noise, batch["draws"], sampling_eps)
    terms.per_sequence = terms.per_sequence * batch["weight"].to(terms.per_sequence)
    return terms


@dataclass
class Selection:
    """What a method trains on from B x G scored completions: `rows` (indices into the rollout), one `weight`
    per row, and the method's metrics (acceptance rate, weight statistics)."""

    rows: list[int]
    weights: list[float]
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.weights):
            raise ValueError(
                f"{len(self.rows)} rows but {len(self.weights)} weights; give one weight per row."
            )


def group_ids(
    n: int, group_size: int, groups: Sequence[int] | None = None, normalize: str = "group"
) -> torch.Tensor:
    """The group [N] of each of N scored completions for a method that compares them: `groups` (prompt ids,
    offline data) or consecutive groups of `group_size` (prompt-major rollouts); one group with
    `normalize="batch"`."""
    if normalize == "batch":
        return torch.zeros(n, dtype=torch.long)
    if groups is not None:
        return torch.as_tensor(list(groups), dtype=torch.long)
    return torch.arange(n) // group_size


def uniform_groups(rewards: torch.Tensor, groups: torch.Tensor) -> set[int]:
    """The groups whose rewards [N] are all equal (no preference among their completions)."""
    return {int(g) for g in torch.unique(groups) if rewards[groups == g].max() == rewards[groups == g].min()}


def _pass_seed(seed: int, iteration: int, n_pass: int) -> int:
    return (seed * 1_000_003 + iteration * 7_919 + n_pass * 104_729 + 0xB0F) % (2**63 - 1)


@dataclass
class ExampleBuffer:
    """The examples of the current iteration (the same on every process) and the stream of minibatches over
    them: `steps_left` updates remain, taking examples in a seeded random order, pass after pass.

    Saved in `TrainState.extra["rl"]` (`state_dict`), so that a resumed run continues the same iteration.
    """

    examples: list[dict[str, Any]] = field(default_factory=list)
    iteration: int = 0  # iterations (rollout + selection) completed so far
    steps_left: int = 0
    cursor: int = 0  # examples taken from the stream in this iteration
    empty_in_row: int = 0  # iterations in a row that selected nothing

    def refill(self, examples: list[dict[str, Any]], batch_size: int, epochs: float) -> None:
        """Start a new iteration on `examples`: `max(1, round(epochs * N / batch_size))` updates (none when
        there are no examples)."""
        self.examples = examples
        self.iteration += 1
        self.cursor = 0
        self.steps_left = max(1, round(epochs * len(examples) / batch_size)) if examples else 0
        self.empty_in_row = 0 if examples else self.empty_in_row + 1

    def next_positions(self, batch_size: int) -> list[int]:
        """The next `batch_size` stream positions (global over processes); their examples are
        `example_at(position, seed)`. Consumes one update."""
        if self.steps_left <= 0 or not self.examples:
            raise RuntimeError("The example buffer is exhausted; refill it with a new iteration first.")
        positions = list(range(self.cursor, self.cursor + batch_size))
        self.cursor += batch_size
        self.steps_left -= 1
        return positions

    def example_at(self, position: int, seed: int) -> dict[str, Any]:
        n = len(self.examples)
        n_pass, offset = divmod(position, n)
        order = torch.randperm(
            n, generator=torch.Generator().manual_seed(_pass_seed(seed, self.iteration, n_pass))
        )
        return self.examples[int(order[offset])]

    def state_dict(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "iteration": self.iteration,
            "steps_left": self.steps_left,
            "cursor": self.cursor,
            "empty_in_row": self.empty_in_row,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any] | None) -> ExampleBuffer:
        return cls(**state) if state else cls()


def micro_batches(
    buffer: ExampleBuffer,
    positions: Sequence[int],
    *,
    accum: int,
    eos_id: int,
    pad_to: int | None,
    seed: int,
    step: int,
    device: torch.device,
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """This process's share of a global minibatch (`positions`), split into `accum` micro-batches, each
    collated and given the noise draws of its examples for `step` (seeded by stream position, so the update
    does not depend on the number of processes or the accumulation split). `collate_fn`: a method's own
    collation (dpo, pg), whose batches carry their own noise ids."""
    world, rank = utils.get_world_size(), utils.get_rank()
    per_rank = len(positions) // world
    mine = list(positions[rank * per_rank : (rank + 1) * per_rank])
    size = len(mine) // accum
    batches = []
    for i in range(accum):
        part = mine[i * size : (i + 1) * size]
        examples = [buffer.example_at(p, seed) for p in part]
        if collate_fn is not None:
            batches.append(collate_fn(examples))
            continue
        batch = to_device(collate(examples, eos_id, pad_to), device)
        id_base = buffer.iteration * 10_000_000
        batch["draws"] = example_noise(
            [id_base + p for p in part], batch["input_ids"].shape[1], seed, step, device
        )
        batches.append(batch)
    return batches


def gather(values: list[Any]) -> list[Any]:
    """The concatenation over processes (in rank order) of each process's list; the list itself with one."""
    if utils.get_world_size() == 1:
        return list(values)
    import torch.distributed as dist

    out: list[list[Any]] = [[] for _ in range(utils.get_world_size())]
    dist.all_gather_object(out, list(values))
    return [v for part in out for v in part]
