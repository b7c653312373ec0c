"""Every config composes, every default of the guide's table holds, and every command line of the guide's
SFT section composes with keys that exist."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import recipe

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
GUIDE = Path(__file__).resolve().parents[2] / "shared" / "spec" / "fine-tuning-guide.md"

GUIDE_DEFAULTS = {
    "sft.pretrained_model": "louaaron/sedd-small",
    "sft.freeze_embeddings": False,
    "sft.dataset": "simplescaling/s1K-1.1",
    "sft.text_field": "text",
    "sft.question_field": None,
    "sft.response_field": None,
    "sft.thinking_field": None,
    "sft.attempt_field": None,
    "sft.max_length": None,
    "optim.lr": 1e-5,
    "optim.warmup": 500,
    "training.n_iters": 50000,
    "training.batch_size": 64,
    "training.accum": 1,
}


def compose_sft(overrides=()):
    recipe.register_resolvers()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose("sft", overrides=list(overrides), return_hydra_config=True)


def test_guide_table_defaults():
    cfg = compose_sft()
    for key, expected in GUIDE_DEFAULTS.items():
        assert OmegaConf.select(cfg, key) == expected, key


def guide_sft_commands() -> list[list[str]]:
    """The `python sft.py ...` command lines of the guide, joined across backslash continuations."""
    text = GUIDE.read_text(encoding="utf-8") if GUIDE.exists() else ""
    joined = text.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("python sft.py"):
            args = [a for a in shlex.split(line)[2:] if a != "-m" and "..." not in a]
            commands.append(args)
    return commands


def test_guide_has_commands():
    if not GUIDE.exists():
        pytest.skip("the guide lives in ../shared/spec beside the checkout")
    assert len(guide_sft_commands()) >= 10


@pytest.mark.parametrize("args", guide_sft_commands() or [[]], ids=lambda a: " ".join(a)[:60])
def test_guide_command_composes(args):
    cfg = compose_sft(args)
    for arg in args:
        key, value = arg.split("=", 1)
        assert OmegaConf.select(cfg, key) is not None or value in ("null", "None"), key
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")


@pytest.mark.parametrize("experiment", ["demo"])
def test_experiments_compose(experiment):
    cfg = compose_sft([f"experiment={experiment}"])
    assert cfg.sft.pretrained_model is None
    assert cfg.model.name == "tiny"


@pytest.mark.parametrize("size", ["tiny", "small", "medium"])
def test_model_configs_build(size):
    import torch

    from model import SEDD

    cfg = compose_sft([f"model={size}", "sft.pretrained_model=null"])
    run_config = {"tokens": cfg.tokens, **{k: OmegaConf.to_container(cfg[k]) for k in ("graph", "noise", "model")}}
    with torch.device("meta"):
        model = SEDD(run_config)
    assert model.arch.hidden_size == cfg.model.hidden_size


def test_troubleshooting_keys_exist():
    cfg = compose_sft()
    for key in ("training.eval_freq", "training.snapshot_freq", "ngpus", "load_dir"):
        assert OmegaConf.select(cfg, key, default="missing") != "missing", key


def test_slurm_launcher_has_no_cluster_names():
    cfg = compose_sft()
    launcher = cfg.hydra.launcher
    assert launcher.partition is None and launcher.account is None
    assert launcher.gpus_per_node == cfg.ngpus == launcher.tasks_per_node


def test_run_dir_uses_dataset_and_load_dir():
    assert recipe._run_dir(None, "exp_local/sft/x") == "exp_local/sft/x"
    assert recipe._run_dir("exp_local/sft/run1", "exp_local/sft/x") == "exp_local/sft/run1"
    assert recipe._dataset_tag("simplescaling/s1K-1.1") == "simplescaling/s1K-1.1"
    assert recipe._dataset_tag("./data/my_set.jsonl") == "my_set"
