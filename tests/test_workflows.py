"""The guide's Workflow 1 through the real command lines, on a tiny model and local data:
SFT (stage 1), run_sample.py on the run directory (unconditional and prompted), then a second SFT stage that
starts from the first one's run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from checkpoint import load_checkpoint
from tests.sft_helpers import TINY_OVERRIDES, write_qa_dataset

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
MATH_ROWS = [
    {"problem": "What is 3 + 3?", "solution": "3 + 3 = 6. \\boxed{6}"},
    {"problem": "What is 4 * 2?", "solution": "4 * 2 = 8. \\boxed{8}"},
    {"problem": "What is 10 - 7?", "solution": "10 - 7 = 3. \\boxed{3}"},
]


def run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{script} {' '.join(args)} failed:\n{result.stderr[-3000:]}"
    return result


def test_workflow_1_sft_sample_then_second_stage(tmp_path):
    stage1 = tmp_path / "exp_local" / "sft" / "stage1"
    run("sft.py", *TINY_OVERRIDES, f"sft.dataset={write_qa_dataset(tmp_path / 'qa')}", "training.n_iters=3",
        f"hydra.run.dir={stage1}", cwd=tmp_path)  # fmt: skip

    unconditional = run("run_sample.py", "--model_path", str(stage1), "--steps", "4", "--device", "cpu",
                        "--format", "jsonl", cwd=tmp_path)  # fmt: skip
    rows = [json.loads(line) for line in unconditional.stdout.splitlines() if line.startswith("{")]
    assert rows and all(isinstance(r["text"], str) for r in rows)
    prompted = run("run_sample.py", "--model_path", str(stage1), "--prompt", "What is 2 + 3?", "--prompt",
                   "Name a red fruit.", "--steps", "4", "--device", "cpu", "--format", "jsonl", cwd=tmp_path)  # fmt: skip
    answers = [json.loads(line) for line in prompted.stdout.splitlines() if line.startswith("{")]
    assert [a["prompt"] for a in answers] == ["What is 2 + 3?", "Name a red fruit."]

    # stage 2: a different dataset (question/solution columns, auto-detected), started from stage 1's run dir;
    # no model= overrides, so a tiny architecture here can only come from stage 1's checkpoint
    math_dir = tmp_path / "math"
    math_dir.mkdir()
    (math_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MATH_ROWS))
    stage2 = tmp_path / "exp_local" / "sft" / "stage2"
    plain = [o for o in TINY_OVERRIDES if not o.startswith(("model", "sft.pretrained_model"))]
    run("sft.py", *plain, f"sft.pretrained_model={stage1}", f"sft.dataset={math_dir}", "sft.question_field=problem",
        "sft.response_field=solution", "training.batch_size=2", "training.n_iters=2", "optim.lr=0", f"hydra.run.dir={stage2}", cwd=tmp_path)  # fmt: skip

    config = json.loads((stage2 / "hf_model" / "config.json").read_text())
    assert config["model"]["hidden_size"] == 32 and config["model"]["n_blocks"] == 1
    # optim.lr=0: stage 2 leaves the weights it started from unchanged, i.e. stage 1's EMA weights
    stage1_state, _ = load_checkpoint(stage1)
    stage2_state, _ = load_checkpoint(stage2)
    ema1 = dict(zip(stage1_state["ema_param_names"], stage1_state["ema"]["shadow_params"], strict=True))
    for name, tensor in stage2_state["model"].items():
        if name in ema1:
            torch.testing.assert_close(tensor, ema1[name], rtol=0, atol=0)
