"""Reward guidance from the command line: run_sample.py and evaluate.py with --guidance svdd|best_of_n make the
rewarded answer more frequent than plain sampling at the same steps and seed, and reject bad flags."""

from __future__ import annotations

import json

import pytest

import evaluate
import run_sample
from tests.rl_helpers import NO, SFT_FORMAT, YES, iid_sedd
from tests.tiny_models import one_thread, save_hub_model  # noqa: F401 (one_thread: autouse fixture)

QUESTIONS = ["Say yes", "Say yes twice", "Is it yes?", "Yes or no?"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A model that answers ' yes' 30% of the time and ' no' otherwise, at every position."""
    return save_hub_model(
        tmp_path_factory.mktemp("guided") / "model", iid_sedd({YES: 0.3, NO: 0.7}), SFT_FORMAT
    )


def test_run_sample_guidance_with_a_format_reward(model_dir, tmp_path):
    def sample(*flags: str) -> list[dict]:
        out = tmp_path / "samples.jsonl"
        argv = ["--model_path", str(model_dir), "--steps", "4", "--num_samples", "8", "--seed", "3"]
        argv += [a for q in QUESTIONS[:2] for a in ("--prompt", q)]
        assert run_sample.main([*argv, "--format", "jsonl", "--output", str(out), *flags]) == 0
        return [json.loads(line) for line in out.read_text().splitlines()]

    starts_with_yes = ["--reward", "format", "--reward_kwargs", '{"pattern": "^ yes"}']
    plain = sample()
    guided = sample("--guidance", "best_of_n", "--guidance_candidates", "4", *starts_with_yes)
    assert len(guided) == len(plain) == 16
    assert all(r["reward"] == float(r["completion"].startswith(" yes")) for r in guided)
    # an answer starts with ' yes' 30% of the time (4.8 of 16), the best of 4 76% of the time (12.2 of 16)
    hits = [sum(r["completion"].startswith(" yes") for r in records) for records in (plain, guided)]
    assert hits[1] >= hits[0] + 4, hits


def test_run_sample_guidance_reads_the_answer_field_of_a_prompts_file(model_dir, tmp_path, capsys):
    prompts = tmp_path / "questions.jsonl"
    prompts.write_text("".join(json.dumps({"question": q, "answer": "#### 0"}) + "\n" for q in QUESTIONS[:2]))
    argv = [
        "--model_path",
        str(model_dir),
        "--prompts_file",
        str(prompts),
        "--steps",
        "2",
        "--format",
        "jsonl",
    ]
    assert run_sample.main([*argv, "--guidance", "best_of_n", "--guidance_candidates", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["reward"] for r in rows] == [0.0, 0.0]  # exact_match against `answer`: no digits, never right
    with pytest.raises(ValueError, match="reference answers in the dataset column 'answer'"):
        run_sample.main(
            ["--model_path", str(model_dir), "--prompt", "Hi", "--steps", "2", "--guidance", "svdd"]
        )


def test_evaluate_accuracy_with_guidance_reports_the_guiding_reward(model_dir, tmp_path):
    def accuracy(*flags: str) -> dict:
        out = tmp_path / "eval.json"
        argv = [
            "--mode",
            "accuracy",
            "--model_path",
            str(model_dir),
            "--dataset",
            "demo/arithmetic",
            "--limit",
            "8",
        ]
        assert evaluate.main([*argv, "--steps", "4", "--output", str(out), *flags]) == 0
        return json.loads(out.read_text())["accuracy"]

    plain = accuracy()
    guided = accuracy(
        "--guidance", "svdd", "--reward", "tests.rl_helpers.yes_share", "--guidance_candidates", "4"
    )
    assert "guidance_reward" not in plain["summary"] and plain["summary"]["examples"] == 8
    words = [[w for e in r["examples"] for c in e["completions"] for w in c.split()] for r in (plain, guided)]
    share = [w.count("yes") / len(w) for w in words]  # 8 answers of about 10 words; 0.3 expected unguided
    assert min(len(w) for w in words) >= 60 and share[1] > share[0] + 0.15, share  # measured: 0.25 -> 0.53
    assert guided["summary"]["guidance_reward"] > 0.45


@pytest.mark.parametrize(
    ("main", "flags", "message"),
    [
        (run_sample.main, ["--guidance", "svdd"], "--guidance steers answers to prompts"),
        (
            run_sample.main,
            ["--prompt", "x", "--guidance_candidates", "0"],
            "--guidance_candidates=0 must be at least 1",
        ),
        (run_sample.main, ["--prompt", "x", "--reward_kwargs", "{x"], "--reward_kwargs is not valid JSON"),
        (
            evaluate.main,
            ["--mode", "likelihood", "--dataset", "d", "--guidance", "svdd"],
            "add accuracy to --mode",
        ),
        (evaluate.main, ["--dataset", "d", "--guidance_alpha", "-1"], "--guidance_alpha=-1.0 must be >= 0"),
    ],
)
def test_bad_guidance_flags(capsys, main, flags, message):
    with pytest.raises(SystemExit):
        main(["--model_path", "x", *flags])
    assert message in capsys.readouterr().err
