"""Tests for checkpoint.py: round trip, rotation, fallback from damaged files, crash safety."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from checkpoint import (
    CheckpointError,
    atomic_torch_save,
    list_snapshots,
    load_checkpoint,
    meta_checkpoint_path,
    save_checkpoint,
)
from model.ema import ExponentialMovingAverage
from utils import rng_state

REPO_ROOT = Path(__file__).resolve().parents[2]


def _state(step: int) -> dict:
    return {"step": step, "w": torch.full((4,), float(step))}


def _temp_files(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob(".*.tmp-*")]


def test_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    ema = ExponentialMovingAverage(model.parameters(), decay=0.999)
    ema.update(model.parameters())
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "ema": ema.state_dict(),
        "step": 7,
        "rng": rng_state(),
    }
    path = save_checkpoint(state, tmp_path, step=7)
    assert path == tmp_path / "checkpoints" / "checkpoint_7.pth"
    assert meta_checkpoint_path(tmp_path) == tmp_path / "checkpoints-meta" / "checkpoint.pth"

    loaded, loaded_path = load_checkpoint(tmp_path)
    assert loaded_path == meta_checkpoint_path(tmp_path)
    assert loaded["step"] == 7 and loaded["ema"]["num_updates"] == 1
    for key, value in model.state_dict().items():
        assert torch.equal(loaded["model"][key], value)
    new_opt = torch.optim.AdamW(torch.nn.Linear(3, 3).parameters(), lr=1e-3)
    new_opt.load_state_dict(loaded["optimizer"])
    assert torch.equal(torch.load(path, weights_only=False)["model"]["weight"], model.weight)
    assert _temp_files(tmp_path) == []


def test_no_checkpoint_returns_none(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path / "missing") is None
    assert list_snapshots(tmp_path) == []


def test_keep_last_rotation(tmp_path: Path) -> None:
    for step in [1, 2, 9, 10, 11]:
        save_checkpoint(_state(step), tmp_path, step, keep_last=2)
    assert [p.name for p in list_snapshots(tmp_path)] == ["checkpoint_10.pth", "checkpoint_11.pth"]
    # The snapshot just written is never removed, even when older-numbered than the others.
    save_checkpoint(_state(3), tmp_path, 3, keep_last=1)
    assert [p.name for p in list_snapshots(tmp_path)] == ["checkpoint_3.pth"]
    for step in [4, 5]:
        save_checkpoint(_state(step), tmp_path, step, keep_last=None)
    assert [p.name for p in list_snapshots(tmp_path)] == [f"checkpoint_{s}.pth" for s in (3, 4, 5)]
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(_state(6), tmp_path, 6, keep_last=0)


def test_meta_only_save(tmp_path: Path) -> None:
    save_checkpoint(_state(1), tmp_path, 1)
    assert save_checkpoint(_state(2), tmp_path, 2, snapshot=False) == meta_checkpoint_path(tmp_path)
    assert len(list_snapshots(tmp_path)) == 1
    assert load_checkpoint(tmp_path)[0]["step"] == 2


def test_truncated_meta_falls_back_to_newest_snapshot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for step in (1, 2, 3):
        save_checkpoint(_state(step), tmp_path, step)
    meta = meta_checkpoint_path(tmp_path)
    meta.write_bytes(meta.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="checkpoint"):
        state, path = load_checkpoint(tmp_path)
    assert path.name == "checkpoint_3.pth" and state["step"] == 3
    assert any(str(meta) in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_validate_rejects_and_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    save_checkpoint({"step": 1, "w": torch.zeros(4)}, tmp_path, 1)
    save_checkpoint({"step": 2, "w": torch.zeros(5)}, tmp_path, 2)

    def validate(state: dict) -> None:
        if state["w"].shape != (4,):
            raise ValueError(f"w has shape {tuple(state['w'].shape)}, expected (4,)")

    with caplog.at_level(logging.WARNING, logger="checkpoint"):
        state, path = load_checkpoint(tmp_path, validate=validate)
    assert state["step"] == 1 and path.name == "checkpoint_1.pth"
    assert "expected (4,)" in caplog.text


def test_all_unreadable_raises(tmp_path: Path) -> None:
    save_checkpoint(_state(1), tmp_path, 1)
    for path in [meta_checkpoint_path(tmp_path), *list_snapshots(tmp_path)]:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="None of the 2 checkpoints") as info:
        load_checkpoint(tmp_path)
    assert "checkpoint_1.pth" in str(info.value)


def _raise_enospc(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failed_save_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    save_checkpoint(_state(1), tmp_path, 1)
    monkeypatch.setattr(os, failing, _raise_enospc)
    with pytest.raises(CheckpointError, match="disk is full.*checkpoint.pth is intact") as info:
        save_checkpoint(_state(2), tmp_path, 2)
    assert str(meta_checkpoint_path(tmp_path)) in str(info.value)
    monkeypatch.undo()
    assert _temp_files(tmp_path) == []
    state, _ = load_checkpoint(tmp_path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(4))
    assert [p.name for p in list_snapshots(tmp_path)] == ["checkpoint_1.pth"]


def test_atomic_save_failure_without_previous(tmp_path: Path) -> None:
    target = tmp_path / "x.pth"
    with pytest.raises(CheckpointError, match="no x.pth was written"):
        atomic_torch_save({"f": lambda: None}, target)  # lambdas cannot be pickled
    assert not target.exists() and list(tmp_path.iterdir()) == []


_LOOP_CHILD = """
import sys, torch
from checkpoint import save_checkpoint
run_dir = sys.argv[1]
print("saving", flush=True)
step = 1
while True:
    save_checkpoint({"step": step, "w": torch.full((4_000_000,), float(step))}, run_dir, step, keep_last=2)
    step += 1
"""

# Deterministic variant: torch.save writes half of the bytes, then the process is killed.
_HALF_WRITE_CHILD = """
import io, sys, time, torch
from checkpoint import save_checkpoint
real_save = torch.save
def half_save(obj, f):
    buf = io.BytesIO()
    real_save(obj, buf)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    f.flush()
    print("half written", flush=True)
    time.sleep(60)
torch.save = half_save
save_checkpoint({"step": 2, "w": torch.full((1000,), 2.0)}, sys.argv[1], 2)
"""


def _run_and_kill(script: str, run_dir: Path, wait_for: str, sleep_s: float) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(run_dir)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == wait_for
        time.sleep(sleep_s)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL


def test_sigkill_in_save_loop_leaves_loadable_checkpoints(tmp_path: Path) -> None:
    save_checkpoint({"step": 0, "w": torch.zeros(4_000_000)}, tmp_path, 0)
    _run_and_kill(_LOOP_CHILD, tmp_path, "saving", sleep_s=0.4)
    # Every checkpoint file present is complete; half-written data only ever sits in temp files.
    for path in [meta_checkpoint_path(tmp_path), *list_snapshots(tmp_path)]:
        state = torch.load(path, weights_only=False)
        assert torch.all(state["w"] == state["step"])
    state, _ = load_checkpoint(tmp_path)
    assert torch.all(state["w"] == state["step"])


def test_sigkill_mid_write_keeps_previous_and_next_save_cleans_up(tmp_path: Path) -> None:
    save_checkpoint(_state(1), tmp_path, 1)
    _run_and_kill(_HALF_WRITE_CHILD, tmp_path, "half written", sleep_s=0.0)
    assert len(_temp_files(tmp_path)) == 1  # the killed save's half-written temp file
    state, path = load_checkpoint(tmp_path)
    assert path == meta_checkpoint_path(tmp_path) and state["step"] == 1
    assert torch.equal(state["w"], torch.ones(4))
    # The next save removes temp files left by dead processes.
    save_checkpoint(_state(3), tmp_path, 3)
    assert _temp_files(tmp_path) == []
    assert [p.name for p in list_snapshots(tmp_path)] == ["checkpoint_1.pth", "checkpoint_3.pth"]


def test_list_snapshots_ignores_other_files(tmp_path: Path) -> None:
    snapshots = tmp_path / "checkpoints"
    snapshots.mkdir()
    for name in [
        "checkpoint_2.pth",
        "checkpoint_10.pth",
        ".checkpoint_11.pth.tmp-1",
        "notes.txt",
        "checkpoint_x.pth",
    ]:
        (snapshots / name).write_bytes(b"")
    assert [p.name for p in list_snapshots(tmp_path)] == ["checkpoint_2.pth", "checkpoint_10.pth"]
