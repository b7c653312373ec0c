"""Noise schedules sigma(t) for t in [0, 1] (SEDD paper, Section 3.3).

`noise(t)` returns `(total_noise, rate_noise)` = (sigma_bar(t), sigma(t)): the integrated noise that
sets the forward marginal p_t = exp(sigma_bar(t) Q) p_0, and its time derivative, which weights the
score-entropy loss (DWDSE, paper Eq. 11).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def get_noise(config: Mapping[str, Any]) -> Noise:
    """Build the schedule named by `config.noise.type` (`loglinear` or `geometric`) of a run config."""
    noise_cfg = config["noise"]
    kind = noise_cfg["type"]
    if kind == "loglinear":
        return LogLinearNoise(eps=noise_cfg.get("eps", 1e-3))
    if kind == "geometric":
        return GeometricNoise(noise_cfg["sigma_min"], noise_cfg["sigma_max"])
    raise ValueError(f"noise.type={kind!r} is not a valid noise schedule; choose 'loglinear' or 'geometric'.")


class Noise(abc.ABC, nn.Module):
    """Base schedule: `forward(t) -> (total_noise(t), rate_noise(t))`, elementwise in `t`."""

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.total_noise(t), self.rate_noise(t)

    @abc.abstractmethod
    def total_noise(self, t: torch.Tensor) -> torch.Tensor:
        """sigma_bar(t) = int_0^t sigma(s) ds (+ sigma_bar(0))."""

    @abc.abstractmethod
    def rate_noise(self, t: torch.Tensor) -> torch.Tensor:
        """sigma(t) = d sigma_bar / dt."""


class LogLinearNoise(Noise):
    """sigma_bar(t) = -log(1 - (1 - eps) t): the absorbing mask probability 1 - e^{-sigma_bar} is (1 - eps) t."""

    def __init__(self, eps: float = 1e-3):
        super().__init__()
        self.eps = eps

    def total_noise(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.log1p(-(1 - self.eps) * t)

    def rate_noise(self, t: torch.Tensor) -> torch.Tensor:
        return (1 - self.eps) / (1 - (1 - self.eps) * t)


class GeometricNoise(Noise):
    """sigma_bar(t) = sigma_min^(1-t) sigma_max^t, so sigma(t) = sigma_bar(t) log(sigma_max / sigma_min)."""

    def __init__(self, sigma_min: float = 1e-3, sigma_max: float = 1.0):
        super().__init__()
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def total_noise(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min ** (1 - t) * self.sigma_max**t

    def rate_noise(self, t: torch.Tensor) -> torch.Tensor:
        return self.total_noise(t) * math.log(self.sigma_max / self.sigma_min)
