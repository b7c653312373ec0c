"""benchmarks/rl_demo.py's control row trains exactly as the RL rows do (same updates, batch, lr and EMA), so
that an RL gain in its table is a gain over training more, not over the start alone."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

import recipe
from benchmarks.rl_demo import TASKS, trained_rows
from tests.rl_helpers import CONFIG_DIR


@pytest.mark.parametrize("task", list(TASKS))
def test_continued_sft_control_matches_the_rl_demo_updates(task):
    """Each task's control trains on the start's SFT data (for "noisy", the noisy answers) with the RL rows'
    updates, batch, lr and EMA, from the task's start; the noisy RL rows use the verifier reward."""
    recipe.register_resolvers()
    experiment, dataset, start = TASKS[task]
    rows = trained_rows(task)
    entrypoint, overrides = rows["sft_continued"]
    assert entrypoint == "sft.py"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        rl = compose("rl", overrides=[f"experiment={experiment}"])
        sft = compose("sft", overrides=[*overrides, f"sft.pretrained_model={start}"])
    for key in ("n_iters", "batch_size", "ema"):
        assert sft.training[key] == rl.training[key], key
    assert sft.optim.lr == rl.optim.lr and sft.optim.warmup == 0 and sft.optim.schedule == "constant"
    assert sft.sft.dataset == rl.rl.dataset == dataset and rl.rl.pretrained_model == start
    assert sft.training.n_iters % sft.training.snapshot_freq == 0  # the control exports its final model
    reward = {"clean": "checked_arithmetic", "noisy": "consistent_arithmetic"}[task]
    assert rl.reward._target_ == f"rl.rewards.{reward}"
    for name, (entrypoint, overrides) in rows.items():
        if entrypoint == "run_rl.py":
            assert overrides[0] == f"experiment={experiment}" and overrides[1].startswith("rl/method="), name


def test_follows_work_and_format_rates_read_every_answer(tmp_path):
    """The table's rates are shares of all answers of an evaluate.py result file (4 here, over 2 questions)."""
    import json

    from benchmarks.rl_demo import completions_of, eval_examples, follows_work_rate, format_rate

    examples = [
        {"completions": ["3 + 5 = 8\n#### 8", "3 + 5 = 9\n#### 9"]},  # follows (true), follows (false)
        {"completions": ["3 + 5 = 8\n#### 9", "eight"]},  # does not follow, no work or answer
    ]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"accuracy": {"examples": examples}}))
    completions = completions_of(eval_examples(path))
    assert follows_work_rate(completions) == 0.5
    assert format_rate(completions) == 0.75


def test_paired_difference_and_its_bootstrap_error():
    """The paired difference is the mean per-question gap; its bootstrap SE is near the analytic standard error
    of a mean (sd / sqrt(n)), zero for identical rows, and rows of different questions are refused."""
    from benchmarks.rl_demo import paired_difference

    reference = [0.0, 0.25, 0.5, 0.75, 1.0] * 40
    same = paired_difference(reference, reference)
    assert same == {"difference": 0.0, "se": 0.0}
    shifted = [min(1.0, r + d) for r, d in zip(reference, [0.25, -0.25, 0.0, 0.5] * 50, strict=True)]
    result = paired_difference(shifted, reference)
    gaps = [a - b for a, b in zip(shifted, reference, strict=True)]
    mean = sum(gaps) / len(gaps)
    sd = (sum((g - mean) ** 2 for g in gaps) / (len(gaps) - 1)) ** 0.5
    assert result["difference"] == pytest.approx(mean)
    assert result["se"] == pytest.approx(sd / len(gaps) ** 0.5, rel=0.1)
    with pytest.raises(ValueError, match="questions"):
        paired_difference([0.5], [0.5, 0.5])


def test_rescore_rebuilds_the_table_from_eval_files(tmp_path, capsys):
    """--rescore recomputes the answer statistics of a finished run from its eval files: rates, and the paired
    differences of accuracy and follows-work rate to the start for every other row (the start gets none); the
    stored train/eval entries stay."""
    import json

    from benchmarks.rl_demo import main

    def eval_file(name, correct, completion="3 + 5 = 8\n#### 8"):
        examples = [{"completions": [completion] * 2, "correct": c} for c in correct]
        (tmp_path / f"eval_{name}.json").write_text(json.dumps({"accuracy": {"examples": examples}}))

    # the start's answers do not follow their work, the trained row's do
    eval_file("sft", [[True, False], [False, False]], completion="3 + 5 = 8\n#### 9")
    eval_file("reft", [[True, True], [True, False]])
    summary = {"sample_accuracy": 0.0, "answered": 1.0}
    row = {"eval": {"summary": summary, "wall_s": 1.0}}
    results_json = tmp_path / "results.json"
    stored = {"settings": {"out": str(tmp_path)}, "results": {"sft": dict(row), "reft": dict(row)}}
    results_json.write_text(json.dumps(stored))
    assert main(["--rescore", str(results_json)]) == 0
    results = json.loads(results_json.read_text())["results"]
    assert "vs_start" not in results["sft"] and results["reft"]["eval"] == row["eval"]
    assert results["reft"]["vs_start"]["difference"] == 0.5  # (1 - 0.5 + 0.5 - 0) / 2
    assert results["reft"]["follows_work_rate"] == 1.0 and results["sft"]["format_rate"] == 1.0
    assert results["reft"]["follows_vs_start"] == {"difference": 1.0, "se": 0.0}
    assert "follows_vs_start" not in results["sft"]
    assert "follows_vs_control" not in results["reft"]  # the run has no control row
    assert "+0.500" in capsys.readouterr().out
    (tmp_path / "eval_reft.json").unlink()
    with pytest.raises(SystemExit, match="lacks eval_reft.json"):
        main(["--rescore", str(results_json)])
