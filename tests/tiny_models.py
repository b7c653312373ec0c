"""Tiny models on the GPT-2 vocabulary for the generation / evaluation / pretraining tests (CPU, seconds)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from model import SEDD
from tests.conftest import randomize_

GPT2_TINY = {
    "tokens": 50257,
    "graph": {"type": "absorb"},
    "noise": {"type": "loglinear"},
    "model": {
        "hidden_size": 32,
        "cond_dim": 16,
        "length": 64,
        "n_blocks": 1,
        "n_heads": 2,
        "scale_by_sigma": True,
        "dropout": 0,
    },
}


def tiny_sedd(seed: int = 0) -> SEDD:
    """A GPT-2-vocabulary SEDD with random weights, in eval mode."""
    return randomize_(SEDD(GPT2_TINY), seed).eval()


def token_preferring_sedd(probs: dict[int, float]) -> SEDD:
    """A SEDD whose every generated token is drawn from `probs` (token id -> probability) whatever the context:
    the output layer ignores its input (zero weight) and its bias puts -inf-like logits elsewhere."""
    model = tiny_sedd()
    with torch.no_grad():
        model.output_layer.linear.weight.zero_()
        model.output_layer.linear.bias.fill_(-60.0)
        for token, p in probs.items():
            model.output_layer.linear.bias[token] = math.log(p)
    return model


def save_hub_model(directory: Path, model: SEDD | None = None, sft_config: dict | None = None) -> Path:
    """`model` (default: `tiny_sedd()`) in hub format, with an `sft_config.json` when given."""
    (model or tiny_sedd()).save_pretrained(directory)
    if sft_config is not None:
        (directory / "sft_config.json").write_text(json.dumps(sft_config), encoding="utf-8")
    return directory


def save_tiny_causal_lm(directory: Path) -> Path:
    """A one-layer GPT-2 with the GPT-2 tokenizer, saved like any HF causal LM (for generative perplexity)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tokenizer import get_tokenizer

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=64, n_embd=16, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(directory)
    get_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run much faster on one thread, and do not fight over cores shared with other jobs.
    Import it into a test module to use it there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def offline_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: offline, one thread."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}
