"""Likelihood evaluation: the negative ELBO of a SEDD model on data, and the generative perplexity of text
under a causal language model.

The negative ELBO of x0 is the expectation over t of the DWDSE (SEDD paper, Eq. 11; `losses.py`), an upper
bound on -log p(x0). It is estimated with `n_t` draws of (t, x_t) per sequence, seeded by (seed, draw,
dataset index) through `training.example_noise`, so two runs agree exactly whatever the batch size:

    result = negative_elbo(model, graph, noise, text_batches(blocks, 8), n_t=8, seed=0)
    result.nats_per_token, result.perplexity_bound          # nats / scored token, exp(nats / token)

For SFT data (`sft_batches`) the prompt stays clean and conditions the model; only response tokens are
scored and the bound is reported per response token (with the EOS that ends the response).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from data import sft_collate
from training import autocast, batch_loss, example_noise, to_device

Batch = tuple[Sequence[int], dict[str, torch.Tensor]]


@dataclass
class LikelihoodResult:
    """Sum of the per-sequence negative ELBO (nats, averaged over the t draws) and the tokens it covers."""

    nats: float
    tokens: int
    sequences: int
    n_t: int

    @property
    def nats_per_token(self) -> float:
        return self.nats / max(self.tokens, 1)

    @property
    def perplexity_bound(self) -> float:
        """exp(nats per token): an upper bound on the model's perplexity."""
        return math.exp(min(self.nats_per_token, 700.0))

    def as_dict(self) -> dict[str, Any]:
        return {
            "nats_per_token": self.nats_per_token,
            "perplexity_bound": self.perplexity_bound,
            "tokens": self.tokens,
            "sequences": self.sequences,
            "n_t": self.n_t,
        }


@torch.no_grad()
def negative_elbo(
    model: nn.Module,
    graph,
    noise,
    batches: Iterable[Batch],
    *,
    n_t: int = 8,
    seed: int = 0,
    sampling_eps: float = 1e-3,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    total: int | None = None,
    show_progress: bool = False,
) -> LikelihoodResult:
    """Negative ELBO of `model` (in eval mode) over `batches` of (dataset indices, batch).

    A batch holds `input_ids`, `attention_mask` and `loss_mask` [B, L] (scored positions) and may hold
    `n_tokens` [B], the tokens each sequence is normalised by (default: its scored positions). Each sequence's
    bound is the mean over `n_t` seeded draws of (t, x_t); `total` (batches) only sizes the progress bar.
    """
    if n_t < 1:
        raise ValueError(f"n_t={n_t} must be at least 1 (t-samples per sequence).")
    device = torch.device(device)
    nats, tokens, sequences = 0.0, 0, 0
    for indices, batch in tqdm(batches, desc="likelihood", total=total, disable=not show_progress):
        batch = to_device(batch, device)
        n_tokens = batch.get("n_tokens")
        if n_tokens is None:
            n_tokens = (batch["loss_mask"].bool() & batch["attention_mask"].bool()).sum(dim=1)
        per_sequence = torch.zeros(len(indices), dtype=torch.float64, device=device)
        for draw in range(n_t):
            draws = example_noise(indices, batch["input_ids"].shape[1], seed, draw, device)
            with autocast(precision, device):
                terms = batch_loss(model, batch, graph, noise, draws, sampling_eps)
            per_sequence += terms.per_sequence.double()
        nats += float(per_sequence.sum()) / n_t
        tokens += int(n_tokens.sum())
        sequences += len(indices)
    if sequences == 0:
        raise ValueError("No sequences to evaluate: the dataset split is empty (or --limit is 0).")
    return LikelihoodResult(nats, tokens, sequences, n_t)


def collate_blocks(blocks, indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """Rows `indices` of packed fixed-length blocks (`data.pack_tokens`) as a batch in which every token is
    real and scored: `input_ids`, `attention_mask` and `loss_mask`, all [B, L]."""
    input_ids = torch.as_tensor([blocks[int(i)]["input_ids"] for i in indices], dtype=torch.long)
    ones = torch.ones_like(input_ids)
    return {"input_ids": input_ids, "attention_mask": ones, "loss_mask": ones}


def text_batches(blocks, batch_size: int) -> Iterator[Batch]:
    """Batches of packed fixed-length blocks (see `collate_blocks`), in order."""
    for start in range(0, len(blocks), batch_size):
        indices = list(range(start, min(start + batch_size, len(blocks))))
        yield indices, collate_blocks(blocks, indices)


def sft_batches(examples, batch_size: int, eos_id: int, pad_to: int | None = None) -> Iterator[Batch]:
    """Batches of tokenized SFT examples (`input_ids`, `prompt_len`; see `data.tokenize_sft_dataset`).

    The prompt conditions, the response and its EOS are scored. With `pad_to` (a model fine-tuned with
    `pad_with_eos`) each sequence is the model's EOS-filled canvas of `pad_to` tokens and the fill is scored
    too, as in training; the bound is still normalised by the response tokens (`n_tokens`).
    """
    from sft import fill_with_eos

    for start in range(0, len(examples), batch_size):
        indices = list(range(start, min(start + batch_size, len(examples))))
        batch = sft_collate([examples[i] for i in indices], pad_id=eos_id, pad_to=pad_to)
        n_tokens = batch["loss_mask"].sum(dim=1).long()
        if pad_to is not None:
            batch = fill_with_eos(batch, eos_id)
        batch["n_tokens"] = n_tokens
        yield indices, batch


# ----------------------------------------------------------------------------- generative perplexity
def load_causal_lm(name_or_path: str | Path, device: torch.device | str = "cpu"):
    """A HuggingFace causal LM and its tokenizer (hub id from the cache or the hub, or a local directory)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
        lm = AutoModelForCausalLM.from_pretrained(str(name_or_path))
    except OSError as err:
        raise FileNotFoundError(
            f"Cannot load the causal LM {str(name_or_path)!r} for generative perplexity ({err}). It is neither a "
            "local directory nor in the HuggingFace cache (offline, the hub cannot be asked). Download it once "
            f"with `huggingface-cli download {name_or_path}`, or pass --eval_model <directory of a causal LM "
            "saved with save_pretrained (model and tokenizer)>."
        ) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm.to(device).eval(), tokenizer


@torch.no_grad()
def causal_lm_nll(
    texts: Sequence[str],
    lm: nn.Module,
    tokenizer,
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    show_progress: bool = False,
) -> LikelihoodResult:
    """Negative log-likelihood of `texts` under a causal LM, summed over tokens (the exp of its per-token mean
    is the generative perplexity). Each text is re-tokenized with the LM's tokenizer, starts from its BOS token
    (so the first token is scored too) and is cut at the LM's context length."""
    device = torch.device(device)
    context = getattr(lm.config, "max_position_embeddings", None) or 1024
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded = [(bos + ids)[:context] for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    nats, tokens = 0.0, 0
    for start in tqdm(range(0, len(encoded), batch_size), desc="genppl", disable=not show_progress):
        rows = encoded[start : start + batch_size]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.as_tensor(row)
            attention_mask[i, : len(row)] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        logits = lm(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
        targets, scored = input_ids[:, 1:], attention_mask[:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        nats += float(nll[scored].sum())
        tokens += int(scored.sum())
    if tokens == 0:
        raise ValueError("No tokens to score: every text is empty.")
    return LikelihoodResult(nats, tokens, len(encoded), n_t=1)
