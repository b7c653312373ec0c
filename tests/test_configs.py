"""Every config composes, every default of the guide's table holds, and every command line of the guide's
SFT section composes with keys that exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import recipe

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "fine-tuning-guide.md"  # the user-facing spec, vendored so a clean clone tests it
SHARED_GUIDE = REPO.parent / "shared" / "spec" / "fine-tuning-guide.md"  # its source, beside the checkout

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
    assert len(guide_sft_commands()) >= 10


@pytest.mark.skipif(
    not SHARED_GUIDE.exists(), reason="no ../shared/spec beside this checkout (a clean clone)"
)
def test_vendored_guide_is_current():
    assert GUIDE.read_text() == SHARED_GUIDE.read_text(), "copy ../shared/spec/fine-tuning-guide.md to docs/"


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
    run_config = {
        "tokens": cfg.tokens,
        **{k: OmegaConf.to_container(cfg[k]) for k in ("graph", "noise", "model")},
    }
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


def leaf_keys(node, prefix=""):
    """Dotted paths of every leaf of a config (lists count as leaves)."""
    if not OmegaConf.is_dict(node):
        return [prefix]
    return [k for key in node for k in leaf_keys(node._get_node(key), f"{prefix}.{key}" if prefix else key)]


@pytest.mark.parametrize("name", ["sft", "train", "rl"])
def test_every_config_key_is_read_by_code(name):
    """No dead keys: the last name of every option appears in the library or entrypoint code (a key read as
    `cfg.x.name`, `cfg["name"]`, a keyword argument of an instantiated `_target_`, or a model-config field)."""
    recipe.register_resolvers()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(name)
    code = " ".join(
        p.read_text() for p in REPO.rglob("*.py") if "tests" not in p.parts and ".venv" not in p.parts
    )
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", code))
    dead = [path for path in leaf_keys(cfg) if path.split(".")[-1] not in words | {"_target_"}]
    assert not dead, f"config keys that no code reads: {dead}"
