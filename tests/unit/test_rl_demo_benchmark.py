"""benchmarks/rl_demo.py's control row trains exactly as the RL rows do (same updates, batch, lr and EMA), so
that an RL gain in its table is a gain over training more, not over the start alone."""

from __future__ import annotations

from hydra import compose, initialize_config_dir

import recipe
from benchmarks.rl_demo import TRAINED
from tests.rl_helpers import CONFIG_DIR


def test_continued_sft_control_matches_the_rl_demo_updates():
    recipe.register_resolvers()
    entrypoint, overrides = TRAINED["sft_continued"]
    assert entrypoint == "sft.py"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        rl = compose("rl", overrides=["experiment=rl_demo"])
        sft = compose("sft", overrides=[*overrides, "sft.pretrained_model=exp_local/demo/sft"])
    for key in ("n_iters", "batch_size", "ema"):
        assert sft.training[key] == rl.training[key], key
    assert sft.optim.lr == rl.optim.lr and sft.optim.warmup == 0 and sft.optim.schedule == "constant"
    assert sft.sft.dataset == rl.rl.dataset == "demo/arithmetic"
    assert sft.training.n_iters % sft.training.snapshot_freq == 0  # the control exports its final model


def test_every_rl_row_uses_the_rl_demo_experiment():
    for name, (entrypoint, overrides) in TRAINED.items():
        if entrypoint == "run_rl.py":
            assert overrides[0] == "experiment=rl_demo" and overrides[1].startswith("rl/method="), name


def test_follows_work_and_format_rates_read_every_answer(tmp_path):
    """The table's rates are shares of all answers of an evaluate.py result file (4 here, over 2 questions)."""
    import json

    from benchmarks.rl_demo import completions_of, follows_work_rate, format_rate

    examples = [
        {"completions": ["3 + 5 = 8\n#### 8", "3 + 5 = 9\n#### 9"]},  # follows (true), follows (false)
        {"completions": ["3 + 5 = 8\n#### 9", "eight"]},  # does not follow, no work or answer
    ]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"accuracy": {"examples": examples}}))
    completions = completions_of(path)
    assert follows_work_rate(completions) == 0.5
    assert format_rate(completions) == 0.75
