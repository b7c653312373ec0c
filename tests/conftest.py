"""Shared fixtures: no network, a tiny SEDD run config and a tiny model with non-trivial random weights."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub: tests never touch the network

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch):
    """Offline even if huggingface_hub was imported before this file (it reads the variable at import)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def tiny_config() -> dict:
    """A SEDD run config (published config.json layout) small enough for CPU tests."""
    return {
        "tokens": 50,
        "graph": {"type": "absorb"},
        "noise": {"type": "loglinear"},
        "model": {
            "hidden_size": 64,
            "cond_dim": 32,
            "length": 64,
            "n_blocks": 2,
            "n_heads": 4,
            "scale_by_sigma": True,
            "dropout": 0.0,
        },
    }


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-initialise every parameter randomly under a fixed seed (adaLN and output layers start at zero).

    Matrices get N(0, 1/fan_in) so every layer, the adaLN gates and the attention logits are O(1): attention is
    far from uniform, so RoPE, masking and the qkv layout all change the output by much more than the test
    tolerances. Norm weights are 1 + N(0, 0.1^2), biases N(0, 0.1^2).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if p.dim() == 2:
                p.copy_(noise / p.shape[1] ** 0.5)
            elif "norm" in name:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


@pytest.fixture
def make_model():
    """`make_model(run_config, seed=0)`: a SEDD in eval mode with random parameters (see `randomize_`)."""
    from model import SEDD

    return lambda config, seed=0: randomize_(SEDD(config), seed).eval()


@pytest.fixture
def tiny_model(tiny_config, make_model):
    return make_model(tiny_config)
