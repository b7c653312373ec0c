"""Text generation with a SEDD model: prompted completions in batches, cut at the first EOS.

Used by sft.py (validation samples), run_sample.py, evaluate.py and the RL rollouts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import sampling
from training import PRECISIONS


@dataclass
class Completion:
    """One generated answer: its tokens (cut at EOS, EOS excluded), its text, and whether an EOS was produced."""

    tokens: list[int]
    text: str
    finished: bool


def cut_at_eos(tokens: Sequence[int], eos_id: int) -> tuple[list[int], bool]:
    tokens = list(tokens)
    if eos_id in tokens:
        return tokens[: tokens.index(eos_id)], True
    return tokens, False


@torch.no_grad()
def complete(
    model,
    graph,
    noise,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    max_length: int,
    steps: int,
    predictor: str = "analytic",
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    seed: int = 0,
    batch_size: int = 16,
    num_samples: int = 1,
    show_progress: bool = False,
) -> list[Completion]:
    """Complete token prompts; returns `len(prompts) * num_samples` completions, prompt-major.

    Each row of a batch holds its own prompt at the start (fixed, never changed by the sampler) followed by
    generated positions; the canvas is `min(max_length, longest prompt + max_new_tokens)` tokens.
    """
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    eos = tokenizer.eos_token_id
    jobs = [list(p) for p in prompts for _ in range(num_samples)]
    too_long = [i for i, p in enumerate(jobs) if len(p) >= max_length]
    if too_long:
        raise ValueError(
            f"{len(too_long)} prompt(s) have max_length={max_length} tokens or more (first: {len(jobs[too_long[0]])}); "
            "shorten them or raise the length."
        )
    results: list[Completion] = []
    batches = range(0, len(jobs), batch_size)
    for start in tqdm(batches, desc="generate", disable=not show_progress or len(batches) == 1):
        batch = jobs[start : start + batch_size]
        length = min(max_length, max(len(p) for p in batch) + max_new_tokens)
        tokens, fixed = sampling.prompt_batch(batch, length, mask_id=graph.dim - 1, pad_id=eos)
        out = sampling.sample(
            model,
            graph,
            noise,
            fixed_tokens=tokens.to(device),
            fixed_mask=fixed.to(device),
            steps=steps,
            predictor=predictor,
            generator=generator,
            show_progress=show_progress and len(batches) == 1,
            autocast_dtype=PRECISIONS[precision],
        )
        for prompt, row in zip(batch, out.tolist(), strict=True):
            answer, finished = cut_at_eos(row[len(prompt) :], eos)
            results.append(Completion(answer, tokenizer.decode(answer), finished))
    return results


def generate_from_token_prompts(model, graph, noise, tokenizer, prompts, **kwargs) -> list[str]:
    """`complete` returning the texts only."""
    return [c.text for c in complete(model, graph, noise, tokenizer, prompts, **kwargs)]


def write_jsonl(path: str | Path, records: Sequence[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
