"""The model's own configuration, and the one adapter from a SEDD run config (the published `config.json`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf


@dataclass(frozen=True)
class SEDDConfig:
    """Architecture of a SEDD transformer. `tokens` counts real tokens; `absorb` adds the mask state."""

    tokens: int = 50257
    hidden_size: int = 768
    cond_dim: int = 128
    length: int = 1024
    n_blocks: int = 12
    n_heads: int = 12
    scale_by_sigma: bool = True
    dropout: float = 0.1
    absorb: bool = True
    mlp_ratio: int = 4

    @property
    def vocab_size(self) -> int:
        """Width of the embedding and output layers: tokens + 1 for the absorbing mask state."""
        return self.tokens + (1 if self.absorb else 0)

    def __post_init__(self) -> None:
        if self.hidden_size % self.n_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} must be divisible by model.n_heads={self.n_heads}."
            )
        if self.scale_by_sigma and not self.absorb:
            raise ValueError(
                "model.scale_by_sigma=True needs graph.type=absorb; set model.scale_by_sigma=False."
            )


def to_container(config: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """A plain, resolved dict from a dict or an OmegaConf config."""
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    return {k: to_container(v) if isinstance(v, Mapping) else v for k, v in config.items()}


def from_run_config(config: Mapping[str, Any] | DictConfig) -> SEDDConfig:
    """Map a whole SEDD run config (keys `tokens`, `graph.type`, `model.*`) to a `SEDDConfig`.

    This is the single adapter for the published `louaaron/sedd-*` `config.json` files.
    """
    cfg = to_container(config)
    missing = [k for k in ("tokens", "graph", "model") if k not in cfg]
    if missing:
        raise ValueError(
            f"Not a SEDD run config: missing {missing}; keys present: {sorted(cfg)}. "
            "A SEDD config.json holds `tokens`, `graph.type` and `model.{hidden_size,cond_dim,n_blocks,...}`."
        )
    model = cfg["model"]
    return SEDDConfig(
        tokens=int(cfg["tokens"]),
        hidden_size=int(model["hidden_size"]),
        cond_dim=int(model["cond_dim"]),
        length=int(model.get("length", 1024)),
        n_blocks=int(model["n_blocks"]),
        n_heads=int(model["n_heads"]),
        scale_by_sigma=bool(model.get("scale_by_sigma", cfg["graph"]["type"] == "absorb")),
        dropout=float(model.get("dropout", 0.0)),
        absorb=cfg["graph"]["type"] == "absorb",
        mlp_ratio=int(model.get("mlp_ratio", 4)),
    )


def to_run_config(config: SEDDConfig, noise: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The minimal run config (published `config.json` layout) that describes `config`."""
    model = {k: v for k, v in asdict(config).items() if k not in ("tokens", "absorb", "mlp_ratio")}
    if config.mlp_ratio != 4:  # not in the published layout (always 4); written only when it differs
        model["mlp_ratio"] = config.mlp_ratio
    return {
        "tokens": config.tokens,
        "graph": {"type": "absorb" if config.absorb else "uniform"},
        "noise": dict(noise)
        if noise is not None
        else {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20},
        "model": {"name": "custom", "type": "ddit", **model},
    }
