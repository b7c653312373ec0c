"""evaluate.py end to end on a tiny saved model: the Makefile's command (accuracy + likelihood) plus
generative perplexity in a subprocess, plain-text likelihood and the argument checks in-process."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate
from tests.tiny_models import (  # noqa: F401 (one_thread: autouse fixture)
    offline_env,
    one_thread,
    save_hub_model,
    save_tiny_causal_lm,
)

ROOT = Path(__file__).resolve().parents[1]
SFT_CONFIG = {"prompt_template": "Question: {question}\nAnswer: ", "max_length": 48, "pad_with_eos": True}


def test_cli_accuracy_likelihood_genppl(tmp_path):
    model_dir = save_hub_model(tmp_path / "model", sft_config=SFT_CONFIG)
    lm_dir = save_tiny_causal_lm(tmp_path / "lm")
    out = tmp_path / "eval.json"
    command = [sys.executable, "evaluate.py", "--model_path", str(model_dir), "--dataset", "demo/arithmetic",
               "--split", "test", "--limit", "3", "--output", str(out), "--mode", "accuracy", "likelihood", "genppl",
               "--num_samples", "2", "--steps", "3", "--n_t", "2", "--eval_model", str(lm_dir),
               "--genppl_samples", "2", "--length", "16"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "accuracy:" in done.stdout and "likelihood:" in done.stdout and "genppl:" in done.stdout

    results = json.loads(out.read_text())
    accuracy = results["accuracy"]
    assert accuracy["summary"]["examples"] == 3
    assert set(accuracy["summary"]) >= {"accuracy", "pass@1", "pass@2", "answered", "finished"}
    for example in accuracy["examples"]:
        assert example["reference"] == example["reference_text"].split("#### ")[1]  # GSM8K-style reference
        assert len(example["completions"]) == len(example["answers"]) == len(example["correct"]) == 2
    likelihood = results["likelihood"]
    assert likelihood["unit"] == "response token" and likelihood["sequences"] == 3
    assert math.isfinite(likelihood["nats_per_token"]) and likelihood["perplexity_bound"] > 1
    genppl = results["genppl"]
    assert len(genppl["samples"]) == 2 and math.isfinite(genppl["gen_perplexity"])


def test_plain_text_likelihood_is_per_token_and_reproducible(tmp_path):
    model_dir = save_hub_model(tmp_path / "model")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(40)))
    runs = []
    for name in ("a.json", "b.json"):
        argv = ["--model_path", str(model_dir), "--dataset", str(corpus), "--split", "train", "--n_t", "2",
                "--length", "32", "--batch_size", "4", "--output", str(tmp_path / name)]  # fmt: skip
        assert evaluate.main(argv) == 0  # default modes: plain text has no answers, so likelihood only
        runs.append(json.loads((tmp_path / name).read_text()))
    assert "accuracy" not in runs[0]
    assert runs[0]["likelihood"]["unit"] == "token" and runs[0]["likelihood"]["tokens"] % 32 == 0
    assert runs[0]["likelihood"]["nats_per_token"] == runs[1]["likelihood"]["nats_per_token"]


def test_argument_errors(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--model_path", "x", "--mode", "accuracy"])
    assert "needs --dataset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--model_path", "x", "--dataset", "d", "--num_samples", "2", "--pass_k", "4"])
    assert "--pass_k" in capsys.readouterr().err
