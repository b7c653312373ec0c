"""run_rl.py with rl/method=reft|rwd on CPU from a tiny GPT-2-vocabulary model: each method raises a synthetic
reward (the share of ' yes' in the answer) in a dozen updates, writes checkpoints, samples/ and hf_model/;
a run stopped at step N and resumed to 2N equals an uninterrupted 2N run; bad input ends with a clear error."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

import recipe
import run_rl
from checkpoint import load_checkpoint
from load_model import load_model
from rl.rwd import reward_weights
from tests.rl_helpers import CONFIG_DIR, iid_sedd, rl_config, save_start_model
from tests.tiny_models import offline_env, one_thread  # noqa: F401 (one_thread: autouse fixture)

ROOT = Path(__file__).resolve().parents[1]


def logged(log: str, prefix: str, name: str) -> list[float]:
    """Values of metric `name` on the log lines `step N {prefix}: ...`, in order."""
    return [float(m) for m in re.findall(rf" {prefix}: .*?\b{name}=([-\d.e+]+|nan)", log)]


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> Path:
    return save_start_model(tmp_path_factory.mktemp("rl") / "start")


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("reft", ["rl.method.threshold=null"]),  # the best of k, whatever its reward: 4 examples, 1 update
        ("rwd", ["rl.kl_estimate=False", "training.batch_size=16"]),  # one update over each iteration's 16
    ],
)
def test_a_tiny_run_raises_a_synthetic_reward_and_writes_its_outputs(tmp_path, start, method, options):
    """Twelve updates, one per iteration."""
    run_dir = tmp_path / method
    cfg = rl_config(
        run_dir,
        start,
        f"rl/method={method}",
        "training.n_iters=12",
        "training.eval_freq=12",
        "training.snapshot_freq=6",
        "optim.lr=1e-2",
        *options,
    )
    run_rl.validate_config(cfg)
    assert run_rl.run_rl(cfg) == "done"
    log = (run_dir / "train.log").read_text()

    # the reward: about 0.3 at the start (the model says ' yes' 30% of the time), far higher after 12 updates
    evals = logged(log, "eval", "reward_mean")
    assert len(evals) == 2 and 0.15 < evals[0] < 0.45 and evals[1] > evals[0] + 0.3, evals
    assert all(math.isfinite(v) for v in logged(log, "train", "loss"))
    acceptance = logged(log, "rollout", "acceptance")
    # reft: the best 1 of k=4, one update each; rwd: all but the groups whose 4 rewards are equal (an iteration
    # without any is sampled again)
    assert acceptance == [0.25] * 12 if method == "reft" else len(acceptance) >= 12 and max(acceptance) == 1
    kl = logged(log, "rollout", "kl")
    if method == "reft":  # the first rollout is sampled by the starting model itself: KL exactly 0
        assert kl[0] == 0 and kl[-1] > 0.05, kl
    else:
        assert not kl and logged(log, "rollout", "weight_ess")

    state, _ = load_checkpoint(run_dir)
    assert state["step"] == 12 and state["extra"]["rl"]["iteration"] == len(acceptance)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "checkpoint_12.pth",
        "checkpoint_6.pth",
    ]
    exported, _, _ = load_model(run_dir / "hf_model")
    start_model = iid_sedd({})
    assert not torch.equal(exported.output_layer.linear.weight, start_model.output_layer.linear.weight)
    gen_config = json.loads((run_dir / "hf_model" / "sft_config.json").read_text())
    assert gen_config["rl_method"] == method and gen_config["max_length"] == 32 and gen_config["pad_with_eos"]

    rows = [json.loads(line) for line in (run_dir / "samples" / "iter_1.jsonl").read_text().splitlines()]
    assert len(rows) == 16  # 4 prompts x k=4
    assert {"prompt", "completion", "reward", "selected", "weight", "correct", "iteration"} <= set(rows[0])
    if method == "rwd":  # resampled in proportion to exp(A / beta): 16 draws, each count within 1 of expected
        assert sum(r["weight"] for r in rows) == 16 and sum(r["selected"] for r in rows) < 16
        rewards = torch.tensor([r["reward"] for r in rows], dtype=torch.float64)
        expected = reward_weights(rewards, torch.arange(16) // 4, weighting="exp", beta=0.5, max_weight=20.0)
        expected = 16 * expected / expected.sum()
        assert all(abs(r["weight"] - float(e)) < 1 for r, e in zip(rows, expected, strict=True))
    if method == "reft":  # the best of each prompt's four
        for b in range(4):
            group = rows[4 * b : 4 * b + 4]
            assert (
                max(group, key=lambda r: r["reward"])["selected"] and len({r["prompt"] for r in group}) == 1
            )
    evaluated = (run_dir / "samples" / "eval_step_12.jsonl").read_text().splitlines()
    assert len(evaluated) == 8


def test_resume_n_plus_n_equals_2n(tmp_path, start):
    """rwd with 2 iterations of 4 updates: the stop at step 3 falls inside the first iteration, so the resumed
    run must restore the iteration's examples and position as well as the weights, optimizer and RNG."""
    common = ["rl/method=rwd", "rl.prompts_per_iter=2", "training.batch_size=2", "training.eval_freq=100"]
    straight = rl_config(tmp_path / "straight", start, *common, "training.n_iters=6")
    assert run_rl.run_rl(straight) == "done"
    first = rl_config(tmp_path / "resumed", start, *common, "training.n_iters=3", "training.snapshot_freq=3")
    assert run_rl.run_rl(first) == "done"
    second = rl_config(tmp_path / "resumed", start, *common, "training.n_iters=6", "training.snapshot_freq=3")
    assert run_rl.run_rl(second) == "done"

    a, _ = load_checkpoint(tmp_path / "straight")
    b, _ = load_checkpoint(tmp_path / "resumed")
    assert a["step"] == b["step"] == 6 and a["extra"]["rl"]["iteration"] == b["extra"]["rl"]["iteration"] == 2
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-6, atol=1e-7)
    logs = [(tmp_path / d / "train.log").read_text() for d in ("straight", "resumed")]
    assert "Resumed from" in logs[1]
    assert logged(logs[0], "train", "loss") == logged(logs[1], "train", "loss")
    assert logged(logs[0], "rollout", "reward_mean") == logged(logs[1], "rollout", "reward_mean")


def test_reward_and_method_configs_instantiate():
    recipe.register_resolvers()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        for reward in ("exact_match", "format", "length", "math_verify", "weighted"):
            cfg = compose("rl", overrides=[f"reward={reward}"])
            assert len(instantiate(cfg.reward)(["q"], ["#### 4"], answer=["#### 4"])) == 1
        for method in ("reft", "rwd"):
            cfg = compose("rl", overrides=[f"rl/method={method}", "experiment=rl_demo"])
            assert instantiate(cfg.rl.method).name == method
            assert cfg.rl.pretrained_model == "exp_local/demo/sft" and cfg.rl.dataset == "demo/arithmetic"
            assert cfg.reward._target_ == "rl.rewards.checked_arithmetic"  # the demo's verifier reward


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rl.pretrained_model=null"], "rl.pretrained_model is required"),
        (["rl/method=rwd", "rl.k=1"], r"rl.k=1 must be at least 2 \(or set rl.method.normalize=batch\)"),
        (["rl.prompts_per_iter=3", "ngpus=2", "device=cpu"], "not divisible by the 2 processes"),
        (["rl.rollout_weights=best"], r"choose one of \('live', 'ema'\)"),
        (["rl.method.selection=top"], "rl.method.selection='top' is not valid"),
    ],
)
def test_bad_config_errors_name_the_fix(tmp_path, start, overrides, message):
    with pytest.raises(ValueError, match=message):
        run_rl.validate_config(rl_config(tmp_path, start, *overrides))


@pytest.mark.parametrize(("method", "hint"), [("rwd", "skip_uniform=False"), ("pg", "normalize=batch")])
def test_no_signal_stops_the_run_with_the_method_s_fix(tmp_path, start, method, hint):
    """A reward that never differs within a group gives rwd and pg nothing to train on: after
    rl.max_empty_iters iterations the run stops with a message naming the method's own fix."""
    cfg = rl_config(
        tmp_path / "run",
        start,
        f"rl/method={method}",
        "reward=custom",
        "reward.path=tests.rl_helpers.constant_reward",
        "rl.max_empty_iters=2",
        "training.n_iters=3",
        "rl.eval_prompts=0",
    )
    with pytest.raises(run_rl.NoSignalError, match=rf"2 iterations in a row.*rl/method={method}.*{hint}"):
        run_rl.run_rl(cfg)


@pytest.mark.parametrize("method", ["rwd", "pg"])
def test_one_completion_per_prompt_with_batch_normalisation_is_valid(tmp_path, start, method):
    """The fix the k=1 error suggests works: weights/advantages normalised over the batch need no groups."""
    run_rl.validate_config(
        rl_config(tmp_path, start, f"rl/method={method}", "rl.k=1", "rl.method.normalize=batch")
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rl.question_field=prompt"], r"no question column 'prompt'.*Set rl.question_field"),
        (["rl.answer_field=solution"], r"rl.answer_field='solution' is not a column.*or null"),
        (["rl.eval_split=validation"], r"not 'validation'; set rl.split / rl.eval_split"),
        (
            ["reward=exact_match", "reward.reference_field=solution"],
            r"column 'solution'.*Set reward.reference_field",
        ),
    ],
)
def test_unknown_dataset_fields_name_the_fix(tmp_path, start, overrides, message):
    cfg = rl_config(tmp_path / "run", start, "training.n_iters=1", *overrides)
    with pytest.raises(ValueError, match=message):
        run_rl.run_rl(cfg)


def test_cli_error_exits_1_with_the_message_and_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "run_rl.py"), f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=offline_env(PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "rl.pretrained_model is required" in result.stderr and "Traceback" not in result.stderr


def test_missing_start_model_is_a_clear_error(tmp_path):
    cfg = rl_config(tmp_path / "run", tmp_path / "no_such_model", "training.n_iters=1")
    with open_dict(cfg):
        cfg.rl.pretrained_model = str(tmp_path / "no_such_model")
    with pytest.raises((FileNotFoundError, ValueError), match="no_such_model"):
        run_rl.run_rl(cfg)
    assert OmegaConf.select(cfg, "rl.pretrained_model").endswith("no_such_model")


def test_rwd_on_an_offline_dataset_of_scored_completions(tmp_path, start):
    rows = [
        {"prompt": f"What is {a} + {b}?", "completion": text, "reward": reward}
        for a, b in [(2, 3), (4, 1), (6, 2), (3, 3)]
        for text, reward in (("yes yes yes", 1.0), ("no no no", 0.0))
    ]
    offline = tmp_path / "scored"
    offline.mkdir()
    (offline / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    cfg = rl_config(
        run_dir,
        start,
        "rl/method=rwd",
        f"rl.method.offline.dataset={offline}",
        "training.n_iters=2",
        "rl.eval_prompts=0",
    )
    run_rl.validate_config(cfg)
    assert run_rl.run_rl(cfg) == "done"
    records = [json.loads(line) for line in (run_dir / "samples" / "iter_1.jsonl").read_text().splitlines()]
    assert len(records) == 8  # the 4 prompts drawn x 2 rows
    # group-normalised advantages are +-1, weights exp(+-1 / beta) = 7.39 and 0.14 (beta = 0.5): resampling
    # 8 draws in proportion gives each right completion 8 * 7.39 / 30.1 = 1.96 -> 2 copies, each wrong one none
    assert [r["weight"] for r in records] == [2.0 if r["reward"] else 0.0 for r in records]
    assert all(math.isfinite(v) for v in logged((run_dir / "train.log").read_text(), "train", "loss"))


@pytest.mark.slow  # two spawned workers: about 20 s on an idle machine, a minute on a busy one
def test_two_processes_on_cpu(tmp_path, start):
    """ngpus=2 (gloo): each process samples half of the prompts; the iteration's examples and samples/ hold both."""
    run_dir = tmp_path / "ddp"
    cfg = rl_config(
        run_dir, start, "ngpus=2", "rl.method.threshold=null", "training.n_iters=1", "rl.eval_prompts=2"
    )
    run_rl.validate_config(cfg)
    recipe.launch(cfg, run_rl.run_rl)
    state, _ = load_checkpoint(run_dir)
    assert state["step"] == 1
    log = (run_dir / "train.log").read_text()
    assert "2 process(es) on cpu" in log and len(logged(log, "eval", "reward_mean")) == 2
    rows = [json.loads(line) for line in (run_dir / "samples" / "iter_1.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and len({r["prompt"] for r in rows}) == 4  # 4 prompts x k=4, gathered from both
