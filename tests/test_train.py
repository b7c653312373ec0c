"""train.py pretrains from scratch on a local text corpus: the validation loss falls, the run directory loads
with load_model (and feeds sft.pretrained_model and run_sample.py), it resumes, and its Hydra main runs end to
end; configs/train.yaml composes with its model/graph/noise groups and keeps the published config layout."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

import recipe
import run_sample
import train
from checkpoint import load_checkpoint
from load_model import load_model, load_pretrained
from tests.tiny_models import offline_env, one_thread  # noqa: F401 (one_thread: autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "configs")
WORDS = "the cat sat on a mat and the dog ran to the big red house by a small tree".split()
TINY = [
    "model=tiny",
    "model.hidden_size=32",
    "model.cond_dim=16",
    "model.n_blocks=1",
    "model.n_heads=2",
    "model.length=16",
    "data.valid=null",
    "data.valid_fraction=0.1",
    "data.num_proc=1",
    "device=cpu",
    "optim.lr=3e-3",
    "optim.warmup=2",
    "training.batch_size=4",
    "training.log_freq=1",
    "training.eval_examples=8",
    "training.ema=0.5",
    "logging.tensorboard=False",
]


def write_corpus(path: Path, lines: int = 200) -> Path:
    gen = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(WORDS), (lines, 8), generator=gen).tolist()
    path.write_text("\n".join(" ".join(WORDS[i] for i in row) + "." for row in picks), encoding="utf-8")
    return path


def compose_train(overrides=(), return_hydra_config=False):
    recipe.register_resolvers()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose("train", overrides=list(overrides), return_hydra_config=return_hydra_config)


def train_config(work_dir: Path, corpus: Path, *overrides: str):
    cfg = compose_train([*TINY, f"data.train={corpus}", *overrides])
    with open_dict(cfg):
        cfg.work_dir = str(work_dir)
    return cfg


def eval_losses(run_dir: Path) -> list[float]:
    return [float(x) for x in re.findall(r"eval: loss=([\d.]+)", (run_dir / "train.log").read_text())]


def test_pretraining_lowers_validation_loss_and_the_run_loads(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt")
    run_dir = tmp_path / "run"
    cfg = train_config(
        run_dir, corpus, "training.n_iters=12", "training.eval_freq=6", "training.snapshot_freq=12",
        "training.snapshot_freq_for_preemption=6", "sampling.n_samples=1", "sampling.steps=2",
    )  # fmt: skip
    assert train.run_train(cfg) == "done"
    losses = eval_losses(run_dir)
    assert len(losses) == 3  # steps 0, 6, 12
    assert losses[-1] < losses[0] - 1.0, losses

    model, graph, _ = load_model(run_dir)  # the run directory: its latest checkpoint, EMA weights
    assert (model.arch.length, model.arch.hidden_size, graph.dim) == (16, 32, 50258)
    exported = json.loads((run_dir / "hf_model" / "config.json").read_text())
    assert exported["graph"]["type"] == "absorb" and exported["noise"]["type"] == "loglinear"
    hub_model, _, _ = load_model(run_dir / "hf_model")
    for name, tensor in hub_model.state_dict().items():
        torch.testing.assert_close(tensor, model.state_dict()[name])  # both are the EMA weights
    assert load_pretrained(run_dir).arch.n_blocks == 1  # what sft.pretrained_model=<run dir> loads
    assert (run_dir / "samples" / "step_12.jsonl").is_file()

    # the guide's `run_sample.py --model_path <run dir>`
    assert run_sample.main(["--model_path", str(run_dir), "--steps", "2", "--batch_size", "2"]) == 0
    assert capsys.readouterr().out.count("[sample ") == 2

    # resume: continue the same run directory to step 14
    resumed = train_config(run_dir, corpus, "training.n_iters=14", "training.eval_freq=100")
    assert train.run_train(resumed) == "done"
    assert "Resumed from" in (run_dir / "train.log").read_text()
    state, _ = load_checkpoint(run_dir)
    assert state["step"] == 14


def test_hydra_main_end_to_end(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", lines=60)
    run_dir = tmp_path / "run"
    command = [sys.executable, "train.py", *TINY, f"data.train={corpus}", "training.n_iters=3",
               "training.eval_freq=100", "training.snapshot_freq=100", "training.snapshot_freq_for_preemption=100",
               f"hydra.run.dir={run_dir}"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    state, _ = load_checkpoint(run_dir)
    assert state["step"] == 3
    assert (run_dir / "hf_model" / "model.safetensors").is_file()
    saved = OmegaConf.load(run_dir / "run_config.yaml")
    assert saved.data.train == str(corpus) and saved.model.length == 16


def test_configs_compose():
    cfg = compose_train(return_hydra_config=True)
    assert cfg.graph.type == "absorb" and cfg.noise.type == "loglinear" and cfg.model.name == "small"
    assert cfg.hydra.run.dir.startswith(f"exp_local/{cfg.data.train}/")
    assert cfg.hydra.launcher.partition is None

    demo = compose_train(["experiment=train_demo"])
    assert demo.model.name == "tiny" and demo.data.train == "demo/arithmetic"

    uniform = compose_train(["graph=uniform", "noise=geometric", "model.scale_by_sigma=False"])
    with torch.device("meta"):
        model = train.build_model(uniform)
    assert model.config.graph.type == "uniform" and model.config.noise.type == "geometric"
    assert not model.absorb


def test_validate_config_errors():
    with pytest.raises(ValueError, match="not divisible"):
        train.validate_config(compose_train(["training.batch_size=6", "training.accum=4"]))
    with pytest.raises(ValueError, match="valid_fraction"):
        train.validate_config(compose_train(["data.valid=null", "data.valid_fraction=0"]))
