"""Helpers for running the real SFT recipe on CPU with a tiny model (used by tests/test_sft*.py)."""

from __future__ import annotations

import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import recipe

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")

QA_PAIRS = [
    {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
    {"question": "What is 7 + 1?", "answer": "7 + 1 = 8\n#### 8"},
    {"question": "Name a red fruit.", "answer": "An apple.\n#### apple"},
    {"question": "What is 9 - 4?", "answer": "9 - 4 = 5\n#### 5"},
]

TINY_OVERRIDES = [
    "model=tiny",
    "model.hidden_size=32",
    "model.cond_dim=16",
    "model.n_blocks=1",
    "model.n_heads=2",
    "sft.pretrained_model=null",
    "device=cpu",
    "optim.lr=1e-3",
    "optim.warmup=2",
    "training.batch_size=4",
    "training.log_freq=1",
    "training.eval_freq=1000",
    "training.snapshot_freq=1000",
    "training.snapshot_freq_for_preemption=1000",
    "training.eval_examples=4",
    "training.ema=0.9",
    "sampling.n_prompts=0",
    "logging.tensorboard=False",
]


def write_qa_dataset(directory: Path, rows=QA_PAIRS, copies: int = 1) -> Path:
    """A local JSONL dataset with GSM8K's columns; `copies` repeats the rows in train."""
    directory.mkdir(parents=True, exist_ok=True)
    train = directory / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for _ in range(copies) for r in rows), encoding="utf-8")
    (directory / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return directory


def sft_config(work_dir: Path, dataset: Path, *overrides: str) -> DictConfig:
    """The composed configs/sft.yaml with the tiny settings, a local dataset and `overrides`."""
    recipe.register_resolvers()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose("sft", overrides=[*TINY_OVERRIDES, f"sft.dataset={dataset}", *overrides])
    with open_dict(cfg):
        cfg.work_dir = str(work_dir)
    return cfg
