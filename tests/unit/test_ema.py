"""Tests for model/ema.py against hand-computed values and the original repo's state-dict format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.ema import ExponentialMovingAverage


def _param(value: float, requires_grad: bool = True) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor([value]), requires_grad=requires_grad)


def test_two_updates_fixed_decay() -> None:
    p = _param(1.0)
    ema = ExponentialMovingAverage([p], decay=0.9, use_num_updates=False)
    with torch.no_grad():
        p.fill_(2.0)
    ema.update([p])  # s = 1 - 0.1 * (1 - 2) = 1.1
    assert ema.shadow_params[0].item() == pytest.approx(1.1)
    with torch.no_grad():
        p.fill_(3.0)
    ema.update([p])  # s = 1.1 - 0.1 * (1.1 - 3) = 1.29
    assert ema.shadow_params[0].item() == pytest.approx(1.29)
    assert ema.num_updates is None


def test_two_updates_with_num_updates_warmup() -> None:
    p = _param(1.0)
    ema = ExponentialMovingAverage([p], decay=0.999)
    with torch.no_grad():
        p.fill_(2.0)
    ema.update([p])  # n = 1: decay = 2 / 11
    s1 = 1.0 - (1 - 2 / 11) * (1.0 - 2.0)
    assert ema.shadow_params[0].item() == pytest.approx(s1)
    with torch.no_grad():
        p.fill_(3.0)
    ema.update([p])  # n = 2: decay = 3 / 12
    s2 = s1 - (1 - 3 / 12) * (s1 - 3.0)
    assert ema.shadow_params[0].item() == pytest.approx(s2)
    assert ema.num_updates == 2


def test_warmup_formula_and_cap() -> None:
    ema = ExponentialMovingAverage([_param(0.0)], decay=0.99)
    for n in range(1, 2000):
        assert ema.current_decay() == pytest.approx(min(0.99, (1 + n) / (10 + n)))
        ema.num_updates = n
    assert ema.current_decay() == 0.99
    assert ExponentialMovingAverage([_param(0.0)], 0.5, use_num_updates=False).current_decay() == 0.5


def test_invalid_decay() -> None:
    with pytest.raises(ValueError, match="decay"):
        ExponentialMovingAverage([_param(0.0)], decay=1.5)


def test_average_parameters_restores_on_exception() -> None:
    model = torch.nn.Linear(3, 2)
    ema = ExponentialMovingAverage(model.parameters(), decay=0.5, use_num_updates=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model.parameters())
    trained = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        with ema.average_parameters(model.parameters()):
            for p, s in zip(model.parameters(), ema.shadow_params, strict=True):
                assert torch.equal(p, s)
            raise RuntimeError("boom")
    for p, t in zip(model.parameters(), trained, strict=True):
        assert torch.equal(p, t)
    assert ema.collected_params == []  # stored copy freed


def test_state_dict_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    ema = ExponentialMovingAverage(model.parameters(), decay=0.9999)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model.parameters())
    torch.save({"ema": ema.state_dict()}, tmp_path / "ckpt.pth")

    other = ExponentialMovingAverage(torch.nn.Linear(4, 4).parameters(), decay=0.5, use_num_updates=False)
    other.load_state_dict(torch.load(tmp_path / "ckpt.pth", weights_only=False)["ema"])
    assert other.decay == 0.9999 and other.num_updates == 3
    for a, b in zip(ema.shadow_params, other.shadow_params, strict=True):
        assert torch.equal(a, b)


def test_loads_original_repo_format_and_rejects_mismatch() -> None:
    model = torch.nn.Linear(2, 3)
    ema = ExponentialMovingAverage(model.parameters(), decay=0.9)
    original = {"decay": 0.9999, "num_updates": 100, "shadow_params": [torch.ones(3, 2), torch.zeros(3)]}
    ema.load_state_dict(original)
    assert ema.num_updates == 100 and torch.equal(ema.shadow_params[0], torch.ones(3, 2))
    with pytest.raises(ValueError, match="shape"):
        ema.load_state_dict({**original, "shadow_params": [torch.ones(2, 3), torch.zeros(3)]})
    with pytest.raises(ValueError, match="different model"):
        ema.load_state_dict({**original, "shadow_params": [torch.ones(3, 2)]})
    with pytest.raises(KeyError, match="num_updates"):
        ema.load_state_dict({"decay": 0.9, "shadow_params": []})


def test_frozen_parameters_are_skipped_consistently() -> None:
    model = torch.nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    ema = ExponentialMovingAverage(model.parameters(), decay=0.0, use_num_updates=False)
    assert len(ema.shadow_params) == 1

    frozen_bias = model.bias.detach().clone()
    with torch.no_grad():
        model.weight.fill_(5.0)
    ema.update(model.parameters())  # decay 0: shadow = weight
    assert torch.equal(ema.shadow_params[0], torch.full((2, 2), 5.0))

    with torch.no_grad():
        model.weight.zero_()
        model.bias.fill_(7.0)
    with ema.average_parameters(model.parameters()):
        assert torch.equal(model.weight, torch.full((2, 2), 5.0))
        assert torch.equal(model.bias, torch.full((2,), 7.0))  # frozen: untouched by copy_to
    assert torch.equal(model.weight, torch.zeros(2, 2))
    assert not torch.equal(model.bias, frozen_bias)

    model.bias.requires_grad_(True)  # a different set of trainable parameters is an error
    with pytest.raises(ValueError, match="same model.parameters"):
        ema.update(model.parameters())


def test_to_dtype() -> None:
    ema = ExponentialMovingAverage(torch.nn.Linear(2, 2).parameters(), decay=0.9)
    assert ema.to("cpu", torch.float64) is ema
    assert all(s.dtype == torch.float64 for s in ema.shadow_params)
    ema.update(torch.nn.Linear(2, 2).parameters())  # fp32 params into fp64 shadows
