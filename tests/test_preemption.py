"""SIGTERM / SIGUSR1 during training: the run saves at the next step boundary, exits 0, and the next start
resumes from that step; an earlier handler (submitit's requeue) is called after the save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoint import load_checkpoint
from recipe import PreemptionFlag
from tests.sft_helpers import TINY_OVERRIDES, write_qa_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_exits_zero_and_resumes(tmp_path, sig):
    data_dir = write_qa_dataset(tmp_path / "data")
    run_dir = tmp_path / "run"
    args = [*TINY_OVERRIDES, f"sft.dataset={data_dir}", f"hydra.run.dir={run_dir}", "training.n_iters=100000"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "sft.py"), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = run_dir / "train.log"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.exists() and log.read_text().count("train: loss=") >= 3):
        time.sleep(0.2)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    state, _ = load_checkpoint(run_dir)
    saved_step = state["step"]
    assert saved_step >= 3
    assert f"saved step {saved_step}" in log.read_text()

    resumed = subprocess.run(
        [sys.executable, str(REPO / "sft.py"), f"load_dir={run_dir}", f"training.n_iters={saved_step + 2}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert load_checkpoint(run_dir)[0]["step"] == saved_step + 2
    assert f"Resumed from" in log.read_text()


def test_previous_handler_is_called_after_the_save():
    calls = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
    try:
        flag = PreemptionFlag()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.is_set() and calls == []  # ours runs first: nothing is handed on before the save
        flag.forward()
        assert calls == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)
