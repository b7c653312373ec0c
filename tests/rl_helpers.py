"""Helpers for the RL tests: a SEDD with a known score, a starting model directory and composed run_rl configs."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import recipe
from model import SEDD
from tests.conftest import randomize_
from tests.tiny_models import GPT2_TINY, save_hub_model

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


def iid_sedd(probs: dict[int, float], tokens: int = 50257) -> SEDD:
    """A tiny SEDD (GPT-2 vocabulary by default, in eval mode) whose score is exact for data of i.i.d. tokens drawn from `probs`:
    at a masked position s_y = p(y) / (e^sigma - 1) (absorbing graph), so every sampler step unmasks
    positions at the true rate, not only the final denoiser. The output layer ignores its input (zero
    weight); its bias is log p(y) + log(V - 1), cancelling the model's -log(V - 1) scaling."""
    model = randomize_(SEDD({**GPT2_TINY, "tokens": tokens})).eval()
    with torch.no_grad():
        linear = model.output_layer.linear
        linear.weight.zero_()
        linear.bias.fill_(-60.0)
        for token, p in probs.items():
            linear.bias[token] = math.log(p) + math.log(linear.bias.numel() - 2)
    return model


YES = 3763  # GPT-2 " yes"
NO = 645  # GPT-2 " no"
SFT_FORMAT = {"prompt_template": "Question: {question}\nAnswer:", "max_length": 32, "pad_with_eos": True}


def yes_share(prompts, completions, **fields) -> list[float]:
    """A synthetic reward (used by import path, `reward.path=tests.rl_helpers.yes_share`): the share of the
    completion's words that are 'yes' (0 for an empty completion)."""
    return [c.split().count("yes") / max(len(c.split()), 1) for c in completions]


def constant_reward(prompts, completions, **fields) -> list[float]:
    """The same reward for every completion: no group prefers any of its completions."""
    return [1.0] * len(completions)


def save_start_model(directory: Path, p_yes: float = 0.3) -> Path:
    """The starting model of the RL tests: `iid_sedd` answering ' yes' with probability `p_yes`, else ' no'
    (never EOS: every answer fills the canvas), saved in hub format with SFT_FORMAT."""
    if not (directory / "config.json").is_file():
        save_hub_model(directory, iid_sedd({YES: p_yes, NO: 1 - p_yes}), SFT_FORMAT)
    return directory


def rl_config(work_dir: Path, start: Path, *overrides: str) -> DictConfig:
    """configs/rl.yaml composed for a few CPU-second run from `start` on demo/arithmetic prompts, rewarded by
    `yes_share` unless `overrides` choose another `reward=`; `overrides` go last."""
    recipe.register_resolvers()
    base = [
        f"rl.pretrained_model={start}",
        "rl.dataset=demo/arithmetic",
        "device=cpu",
        "rl.k=4",
        "rl.prompts_per_iter=4",
        "rl.eval_prompts=8",
        "sampling.steps=4",
        "training.batch_size=4",
        "training.log_freq=1",
        "training.ema=0.0",
        "logging.tensorboard=False",
    ]
    if not any(o.startswith("reward=") for o in overrides):
        base += ["reward=custom", "reward.path=tests.rl_helpers.yes_share"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose("rl", overrides=[*base, *overrides])
    with open_dict(cfg):
        cfg.work_dir = str(work_dir)
    return cfg
