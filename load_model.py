"""`load_model(path_or_hub_id, device) -> (model, graph, noise)`, as in the original SEDD repository.

Accepts a HuggingFace Hub id, a hub-format directory (config.json + weights), or a training run directory of
`train.py` / `sft.py` / `run_rl.py` (its latest readable checkpoint, with the EMA weights swapped in).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

import graph_lib
import noise_lib
from model import SEDD
from model.hub_io import ModelNotFoundError, is_hub_directory

RUN_CONFIG_FILE = Path(".hydra") / "config.yaml"


def is_run_directory(path: str | Path) -> bool:
    path = Path(path)
    return (path / "checkpoints-meta").is_dir() or (path / "checkpoints").is_dir()


def ema_weights(model: torch.nn.Module, state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model's state dict with the EMA shadow parameters of a training checkpoint swapped in.

    Shadow parameters are matched by `ema_param_names` when the checkpoint has them (frozen parameters have
    no shadow), else in order over all parameters (the original repository's checkpoints).
    """
    weights = dict(model.state_dict())
    ema = state.get("ema")
    if ema is None:
        return weights
    names = state.get("ema_param_names") or [n for n, _ in model.named_parameters()]
    shadow = ema["shadow_params"]
    if len(names) != len(shadow):
        raise ValueError(
            f"EMA state has {len(shadow)} tensors but {len(names)} parameter names were expected."
        )
    weights.update(zip(names, shadow, strict=True))
    return weights


def model_from_checkpoint(state: Mapping[str, Any], run_dir: Path, use_ema: bool = True) -> SEDD:
    """Build the SEDD of a run's checkpoint (`model_config` inside it, else the run's Hydra config)."""
    config = state.get("model_config")
    if config is None:
        config_file = run_dir / RUN_CONFIG_FILE
        if not config_file.is_file():
            raise ModelNotFoundError(
                f"{run_dir} has checkpoints but neither a model_config in them nor {config_file}."
            )
        config = OmegaConf.load(config_file)
    model = SEDD(config)
    model.load_weights(state["model"])
    if use_ema:
        model.load_weights(ema_weights(model, state))
    return model


def load_run_model(run_dir: str | Path, device: torch.device | str = "cpu", use_ema: bool = True) -> SEDD:
    """The latest readable checkpoint of a training run directory, EMA weights by default."""
    from checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    found = load_checkpoint(run_dir, map_location="cpu")
    if found is None:
        raise ModelNotFoundError(f"Run directory {run_dir} has no checkpoint yet.")
    state, _ = found
    return model_from_checkpoint(state, run_dir, use_ema).to(device)


def load_pretrained(
    path_or_hub_id: str | Path, device: torch.device | str = "cpu", **hub_kwargs: Any
) -> SEDD:
    """A SEDD from a run directory, a hub-format directory or a hub id (told apart automatically)."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir() and not is_hub_directory(path) and is_run_directory(path):
        return load_run_model(path, device)
    return SEDD.from_pretrained(str(path_or_hub_id), map_location=device, **hub_kwargs)


def load_model(path_or_hub_id: str | Path, device: torch.device | str = "cpu"):
    """Original API: `(model, graph, noise)` with the model on `device` in eval mode."""
    model = load_pretrained(path_or_hub_id, device).eval()
    graph = graph_lib.get_graph(model.config, device)
    noise = noise_lib.get_noise(model.config).to(device)
    return model, graph, noise
