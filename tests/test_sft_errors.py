"""Bad input to sft.py: each case exits non-zero with one clear message (no traceback) and leaves nothing
that breaks a later run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model import SEDD
from tests.sft_helpers import TINY_OVERRIDES, write_qa_dataset
from tests.tiny_models import GPT2_TINY

REPO = Path(__file__).resolve().parents[1]


def run_sft(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("SEDD_TRACEBACK", None)
    return subprocess.run(
        [sys.executable, str(REPO / "sft.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


CASES = {
    "missing model path": (["sft.pretrained_model=./no/such/model"], "does not exist"),
    "hub unreachable": (["sft.pretrained_model=louaaron/sedd-small"], "Could not reach the HuggingFace Hub"),
    "missing field": (["sft.question_field=problem"], "Columns present: ['question', 'answer']"),
    "no expected fields": (["sft.dataset={nofields}"], "Cannot tell which columns to train on"),
    "empty dataset": (["sft.dataset={empty}"], "empty"),
    "every example too long": (["sft.max_length=6"], "Raise sft.max_length"),
    "non-text field": (["sft.dataset={listfield}"], "not text"),
    "batch not divisible": (
        ["training.batch_size=5", "training.accum=2"],
        "not divisible by ngpus * training.accum",
    ),
    "more gpus than present": (["ngpus=2", "device=auto"], "CUDA device(s) are visible"),
    "thinking without attempt": (["sft.thinking_field=question"], "sft.thinking_field and sft.attempt_field"),
    "unwritable output": (["hydra.run.dir=/proc/sedd-run"], "/proc/sedd-run"),
    "missing dataset path": (["sft.dataset=./no/data.jsonl"], "no/data.jsonl"),
    "vocabulary mismatch": (["sft.pretrained_model={smallvocab}"], "The model has 1000 tokens"),
}


def save_small_vocabulary_model(directory: Path) -> Path:
    """A hub-format checkpoint of a model whose vocabulary (1000 tokens) is not GPT-2's."""
    config = {**GPT2_TINY, "tokens": 1000}
    SEDD(config).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_with_a_clear_message(tmp_path, case):
    data_dir = write_qa_dataset(tmp_path / "data")
    files = {
        "nofields": write_rows(tmp_path / "nofields.jsonl", [{"a": "x", "b": "y"}] * 3),
        "empty": write_rows(tmp_path / "empty.jsonl", []),
        "listfield": write_rows(tmp_path / "listfield.jsonl", [{"question": ["a", "b"], "answer": "c"}] * 3),
        "smallvocab": save_small_vocabulary_model(tmp_path / "smallvocab"),
    }
    overrides, expected = CASES[case]
    overrides = [o.format(**files) for o in overrides]
    base = [
        *TINY_OVERRIDES,
        f"sft.dataset={data_dir}",
        "training.n_iters=1",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    result = run_sft(*base, *overrides, cwd=tmp_path)
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    # nothing left behind stops a correct run in the same directory
    if case != "unwritable output":
        ok = run_sft(*base, cwd=tmp_path)
        assert ok.returncode == 0, ok.stderr[-2000:]


def test_unknown_config_key_is_rejected(tmp_path):
    result = run_sft("training.no_such_key=1", cwd=tmp_path)
    assert result.returncode != 0
    assert "no_such_key" in result.stderr
