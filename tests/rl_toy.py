"""A toy task whose distribution is known exactly, for the likelihood estimators and the DPO / policy-gradient
tests: a one-token prompt (PROMPT) and two-token completions over a 5-token vocabulary, a SEDD small enough to
fit it on CPU in seconds, and the batches / scorer / sampler those tests share."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

import graph_lib
import noise_lib
from losses import score_entropy_loss
from model import SEDD
from rl.buffer import collate, make_example
from rl.estimators import Scorer

TOY_CONFIG = {
    "tokens": 5,
    "graph": {"type": "absorb"},
    "noise": {"type": "loglinear"},
    "model": {
        "hidden_size": 32,
        "cond_dim": 16,
        "length": 4,
        "n_blocks": 1,
        "n_heads": 2,
        "scale_by_sigma": True,
        "dropout": 0.0,
    },
}
PROMPT = [0]
PAD = 4  # collation pad id (never used: all toy completions have two tokens)
# y2 is a function of y1 (strongly correlated), with well-separated probabilities
TRUE_P = {(1, 2): 0.5, (2, 3): 0.25, (3, 4): 0.15, (4, 1): 0.1}


def toy_parts(model: SEDD):
    return graph_lib.get_graph(model.config), noise_lib.get_noise(model.config)


def train_toy(steps: int = 500, batch_size: int = 512, seed: int = 0) -> SEDD:
    """A toy SEDD fitted to samples of TRUE_P (Adam, linear decay), in eval mode."""
    torch.manual_seed(seed)
    model = SEDD(TOY_CONFIG)
    graph, noise = toy_parts(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)
    completions = list(TRUE_P)
    probs = torch.tensor([TRUE_P[c] for c in completions])
    loss_mask = torch.tensor([[0, 1, 1]]).expand(batch_size, 3)
    for _ in range(steps):
        rows = torch.multinomial(probs, batch_size, replacement=True)
        x0 = torch.tensor([[*PROMPT, *completions[i]] for i in rows])
        loss = score_entropy_loss(model, x0, graph, noise, loss_mask=loss_mask).mean_per_token()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@functools.lru_cache(maxsize=1)
def _trained_toy_state() -> dict[str, torch.Tensor]:
    return train_toy().state_dict()


def trained_toy() -> SEDD:
    """A fresh copy of the `train_toy()` model, trained once per test session (one thread, ~5 s)."""
    model = SEDD(TOY_CONFIG)
    model.load_state_dict(_trained_toy_state())
    return model.eval()


def toy_examples(completions: Sequence[Sequence[int]], weights: Sequence[float] | None = None) -> list[dict]:
    weights = [1.0] * len(completions) if weights is None else weights
    return [make_example(PROMPT, c, False, PAD, w) for c, w in zip(completions, weights, strict=True)]


def toy_batch(completions: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """A collated batch of PROMPT + each completion (completion positions scored)."""
    return collate(toy_examples(completions), PAD, None)


def toy_scorer(reference: SEDD, **options) -> Scorer:
    """A `Scorer` on the toy layout (plain ELBO unless `estimator` is given)."""
    graph, noise = toy_parts(reference)
    return Scorer(graph, noise, reference, **{"eos_id": PAD, "pad_to": None, **options})


def method_scorer(method, reference: SEDD) -> Scorer:
    """The `Scorer` that run_rl.py builds for `method` (its estimator options), on the toy layout."""
    graph, noise = toy_parts(reference)
    return method.scorer(graph, noise, reference, eos_id=PAD, pad_to=None)


@torch.no_grad()
def sample_toy(model: SEDD, n: int, generator: torch.Generator, steps: int = 4) -> list[tuple[int, int]]:
    """`n` completions of PROMPT sampled from `model` (eval mode)."""
    import sampling

    graph, noise = toy_parts(model)
    tokens = torch.tensor([[*PROMPT, 0, 0]]).repeat(n, 1)
    fixed = torch.tensor([[True, False, False]]).repeat(n, 1)
    out = sampling.sample(
        model, graph, noise, fixed_tokens=tokens, fixed_mask=fixed, steps=steps, generator=generator
    )
    return [tuple(row[1:]) for row in out.tolist()]
