"""Rollouts: batched prompted generation from the current policy, `k` completions per prompt, cut at EOS.

    prompts = build_prompt_set(rows, "question", tokenizer, template, max_length)
    with policy_weights(state, use_ema=False) as model:
        rollout = generate_rollouts(model, graph, noise, tokenizer, prompts.ids[:8], prompts.questions[:8],
                                    k=4, max_length=48, pad_with_eos=True, steps=48)
    rollout.input_ids            # [B x G, L]: prompt, completion, EOS (fill)  (B = 8 prompts, G = k = 4)
    rollout.texts[5]             # 2nd completion of the 2nd prompt (rows are prompt-major: b * G + g)

The tensors are laid out as the starting model's SFT batches (`rl.buffer.collate`), so a rollout row is a
ready training example and its completion mask is the SFT loss mask.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from generation import complete, encode_prompts
from rl.buffer import collate, make_example
from training import TrainState

logger = logging.getLogger(__name__)


@dataclass
class PromptSet:
    """The questions of a dataset split, rendered in the prompt template and tokenized.

    `ids[i]` prompt token ids, `questions[i]` the question text (what rewards see as the prompt) and
    `fields[column][i]` the split's other columns (the reference answer, ...), all of the same length.
    """

    ids: list[list[int]]
    questions: list[str]
    fields: dict[str, list[Any]]

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, indices: Sequence[int]) -> tuple[list[list[int]], list[str], dict[str, list[Any]]]:
        """(ids, questions, fields) of the prompts at `indices`."""
        idx = [int(i) for i in indices]
        return (
            [self.ids[i] for i in idx],
            [self.questions[i] for i in idx],
            {k: [v[i] for i in idx] for k, v in self.fields.items()},
        )


def build_prompt_set(
    rows, question_field: str, tokenizer, template: str | None, max_length: int
) -> PromptSet:
    """Prompts of a `datasets.Dataset` split; questions whose prompt fills the `max_length` canvas are
    dropped with a warning (they leave no room for an answer)."""
    if question_field not in rows.column_names:
        raise ValueError(
            f"The dataset has no question column {question_field!r}; its columns are {rows.column_names}. "
            "Set rl.question_field."
        )
    questions = [str(q) for q in rows[question_field]]
    ids = encode_prompts(tokenizer, questions, template)
    others = {c: list(rows[c]) for c in rows.column_names if c != question_field}
    keep = [i for i, p in enumerate(ids) if len(p) < max_length]
    if len(keep) < len(ids):
        logger.warning(
            f"Dropped {len(ids) - len(keep)} of {len(ids)} prompts that fill the {max_length}-token canvas."
        )
    if not keep:
        raise ValueError(f"No prompt fits the {max_length}-token canvas; raise rl.max_length.")
    return PromptSet(
        [ids[i] for i in keep],
        [questions[i] for i in keep],
        {c: [v[i] for i in keep] for c, v in others.items()},
    )


@dataclass
class Rollout:
    """G completions of each of B prompts, prompt-major: row `b * G + g` is completion g of prompt b.

    input_ids        [B x G, L] long   prompt, completion, its EOS, then EOS padding
    attention_mask   [B x G, L] long   1 on attended tokens (all of them when EOS-filled: `pad_with_eos`)
    completion_mask  [B x G, L] bool   completion tokens, their EOS (and the EOS fill): the scored positions
    prompt_len       [B x G] long
    completion_len   [B x G] long      generated tokens before the EOS
    finished         [B x G] bool      an EOS ended the completion
    group            [B x G] long      b, the prompt of each row
    tokens           B x G lists       the completion token ids (cut at EOS, EOS excluded)
    texts            B x G strings     the completions decoded
    prompt_ids       B lists           the prompts' token ids
    questions        B strings         the prompts' question texts (the rewards' `prompts`)
    fields           {column: B values} the prompts' other dataset columns
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    prompt_len: torch.Tensor
    completion_len: torch.Tensor
    finished: torch.Tensor
    group: torch.Tensor
    tokens: list[list[int]]
    texts: list[str]
    prompt_ids: list[list[int]]
    questions: list[str]
    fields: dict[str, list[Any]]
    group_size: int

    def __len__(self) -> int:
        return len(self.texts)

    def row_questions(self) -> list[str]:
        """The question of every row, [B x G]."""
        return [self.questions[b] for b in self.group.tolist()]

    def row_fields(self) -> dict[str, list[Any]]:
        """Every field repeated per row, {column: [B x G]}."""
        rows = self.group.tolist()
        return {k: [v[b] for b in rows] for k, v in self.fields.items()}

    def examples(self, rows: Sequence[int], weights: Sequence[float], eos_id: int) -> list[dict[str, Any]]:
        """SFT examples (`rl.buffer.make_example`) of `rows` with their weights."""
        return [
            make_example(
                self.prompt_ids[int(self.group[r])], self.tokens[r], bool(self.finished[r]), eos_id, w
            )
            for r, w in zip(rows, weights, strict=True)
        ]

    def batch(self, rows: Sequence[int], eos_id: int, pad_to: int | None) -> dict[str, torch.Tensor]:
        """Rows `rows` as a collated SFT batch (weights 1)."""
        return collate(self.examples(rows, [1.0] * len(rows), eos_id), eos_id, pad_to)


@contextlib.contextmanager
def policy_weights(state: TrainState, use_ema: bool) -> Iterator[torch.nn.Module]:
    """The policy in eval mode, with the EMA weights swapped in when `use_ema` (live weights otherwise);
    training mode and weights come back on exit."""
    model = state.model
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    swap = state.ema.average_parameters(params) if use_ema else contextlib.nullcontext()
    try:
        with swap:
            yield model
    finally:
        model.train(was_training)


def generate_rollouts(
    model,
    graph,
    noise,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    questions: Sequence[str],
    fields: Mapping[str, Sequence[Any]] | None = None,
    *,
    k: int,
    max_length: int,
    pad_with_eos: bool,
    max_new_tokens: int = 256,
    steps: int,
    predictor: str = "analytic",
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    seed: int = 0,
    batch_size: int = 64,
    show_progress: bool = False,
) -> Rollout:
    """`k` completions of each prompt from `model` (in eval mode), as a `Rollout` of B x k rows.

    The canvas is the starting model's: the whole `max_length` when it was fine-tuned with `pad_with_eos`,
    else the prompt plus up to `max_new_tokens`. Completions are cut at the first EOS (`generation.complete`).
    """
    if k < 1:
        raise ValueError(f"k={k} completions per prompt must be at least 1.")
    eos = tokenizer.eos_token_id
    completions = complete(
        model,
        graph,
        noise,
        tokenizer,
        prompt_ids,
        max_new_tokens=max_length if pad_with_eos else max_new_tokens,
        max_length=max_length,
        steps=steps,
        predictor=predictor,
        device=device,
        precision=precision,
        seed=seed,
        batch_size=batch_size,
        num_samples=k,
        show_progress=show_progress,
    )
    group = torch.arange(len(prompt_ids)).repeat_interleave(k)
    finished = torch.tensor([c.finished for c in completions], dtype=torch.bool)
    examples = [
        make_example(prompt_ids[b], c.tokens, c.finished, eos)
        for b, c in zip(group.tolist(), completions, strict=True)
    ]
    batch = collate(examples, eos, max_length if pad_with_eos else None)
    return Rollout(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        completion_mask=batch["loss_mask"].bool() & batch["attention_mask"].bool(),
        prompt_len=batch["prompt_len"],
        completion_len=torch.tensor([len(c.tokens) for c in completions], dtype=torch.long),
        finished=finished,
        group=group,
        tokens=[c.tokens for c in completions],
        texts=[c.text for c in completions],
        prompt_ids=[list(p) for p in prompt_ids],
        questions=list(questions),
        fields={key: list(v) for key, v in (fields or {}).items()},
        group_size=k,
    )


def summary(values: Sequence[float], prefix: str) -> dict[str, float]:
    """`{prefix}_mean`, `_std`, `_max` (and `_min`) of a list of numbers (population std)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if t.numel() == 0:
        return {}
    return {
        f"{prefix}_mean": float(t.mean()),
        f"{prefix}_std": float(t.std(unbiased=False)),
        f"{prefix}_max": float(t.max()),
        f"{prefix}_min": float(t.min()),
    }
