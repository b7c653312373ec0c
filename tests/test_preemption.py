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
    assert "Resumed from" in log.read_text()


@pytest.mark.parametrize("sig", PreemptionFlag.SIGNALS)
def test_previous_handler_is_called_after_the_save(sig):
    """submitit installs its requeue handler on SIGUSR2 (and a bypass on SIGTERM) before the job runs."""
    calls = []
    previous = signal.signal(sig, lambda signum, frame: calls.append(signum))
    try:
        flag = PreemptionFlag()
        os.kill(os.getpid(), sig)
        assert flag.is_set() and calls == []  # ours runs first: nothing is handed on before the save
        flag.forward()
        assert calls == [sig]
        assert signal.getsignal(sig) is not flag._handle  # the earlier handler is back
    finally:
        signal.signal(sig, previous)


def submitit_workers(sweep_dir: Path) -> list[int]:
    """Pids of the submitit local job processes of a sweep (`python -m submitit.core._submit <sweep>/.submitit/...`)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:  # the process ended while we looked
            continue
        if b"submitit.core._submit" in args and any(str(sweep_dir).encode() in a for a in args):
            pids.append(int(cmdline.parent.name))
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the job process through /proc (Linux)")
def test_submitit_job_saves_requeues_and_resumes(tmp_path):
    """SIGUSR2 is what SLURM sends a submitit job before its time limit or on preemption: the run saves,
    submitit requeues the job (hydra-submitit-launcher's `checkpoint`), and the requeued job resumes the run."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    # long enough that the run cannot finish between the log poll and the signal (12 steps could, when idle)
    n_iters = 300
    data_dir = write_qa_dataset(tmp_path / "data")
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep}",
            *TINY_OVERRIDES, f"sft.dataset={data_dir}", f"training.n_iters={n_iters}"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "sft.py"), *args], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    log = sweep / "0" / "train.log"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.exists() and log.read_text().count("train: loss=") >= 3):
        time.sleep(0.2)
    workers = submitit_workers(sweep)
    assert len(workers) == 1, workers
    os.kill(workers[0], signal.SIGUSR2)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    text = log.read_text()
    saved = int(text.split("saved step ")[1].split()[0])
    assert 3 <= saved < n_iters
    assert f"Resumed from {sweep / '0' / 'checkpoints-meta' / 'checkpoint.pth'} at step {saved}" in text
    assert load_checkpoint(sweep / "0")[0]["step"] == n_iters
