"""Tests for utils.py: launch detection, single-process helpers, 2-process gloo run, logging, RNG."""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import utils
from utils import (
    DistInfo,
    all_reduce_mean,
    barrier,
    broadcast_object,
    check_writable_dir,
    cleanup_distributed,
    count_parameters,
    detect_launch,
    get_logger,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    resolve_device,
    rng_state,
    set_rng_state,
    set_seed,
    spawn_local_workers,
)

_LAUNCH_VARS = [
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NTASKS",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_JOB_NODELIST",
    "SLURM_NODELIST",
    "SLURM_JOB_ID",
]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in _LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


# ---------------------------------------------------------------------------- launch detection


def test_detect_launch_single_process() -> None:
    assert detect_launch({}) is None
    assert detect_launch({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}) is None
    assert detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1"}) is None


def test_detect_launch_torchrun() -> None:
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "host0", "MASTER_PORT": "1234"}
    info = detect_launch(env)
    assert info == DistInfo(5, 1, 8, info.device, "host0", 1234)
    assert info.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_detect_launch_torchrun_missing_master() -> None:
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        detect_launch({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"})


def test_detect_launch_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(utils.shutil, "which", lambda name: None)  # no scontrol: parse the nodelist
    env = {
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "4",
        "SLURM_JOB_NODELIST": "gpu-node[07-08]",
        "SLURM_JOB_ID": "123456",
    }
    info = detect_launch(env)
    assert info is not None
    assert (info.rank, info.local_rank, info.world_size) == (3, 1, 4)
    assert info.master_addr == "gpu-node07"
    assert info.master_port == 15000 + 123456 % 20000
    # Explicit MASTER_ADDR/PORT win; the step's task count wins over the job's.
    env.update(MASTER_ADDR="10.0.0.1", MASTER_PORT="29999", SLURM_STEP_NUM_TASKS="2")
    info = detect_launch(env)
    assert (info.master_addr, info.master_port, info.world_size) == ("10.0.0.1", 29999, 2)


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("node[01-04]", "node01"),
        ("a,b", "a"),
        ("single", "single"),
        ("gpu[3,5-7],cpu1", "gpu3"),
        ("rack[2-3]-n[10-11]", "rack2-n10"),
    ],
)
def test_parse_first_host(nodelist: str, first: str) -> None:
    assert utils._parse_first_host(nodelist) == first


# ---------------------------------------------------------------------------- one process


def test_single_process_helpers(clean_env: pytest.MonkeyPatch) -> None:
    assert get_rank() == 0 and get_world_size() == 1 and is_main_process()
    barrier()
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_mean(t) is t and t.tolist() == [1.0, 2.0]
    obj = {"a": 1}
    assert broadcast_object(obj) is obj
    cleanup_distributed()  # no group: nothing to do


def _two_process_worker(out_dir: str) -> None:
    info = detect_launch()
    assert info is not None
    init_distributed(info)
    try:
        rank = get_rank()
        mean = all_reduce_mean(torch.tensor([float(rank + 1)])).item()
        obj = broadcast_object({"from": rank})
        barrier()
        result = {
            "rank": rank,
            "world": get_world_size(),
            "main": is_main_process(),
            "mean": mean,
            "obj": obj,
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        cleanup_distributed()


def test_spawn_local_workers_gloo(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spawn_local_workers(_two_process_worker, 2, (str(tmp_path),))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, res in enumerate(results):
        assert res == {"rank": rank, "world": 2, "main": rank == 0, "mean": 1.5, "obj": {"from": 0}}


def test_spawn_local_workers_rejects_zero() -> None:
    with pytest.raises(ValueError, match="nprocs"):
        spawn_local_workers(print, 0)


# ---------------------------------------------------------------------------- logging


def test_get_logger_rank0(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    log_file = tmp_path / "logs" / "run.log"
    logger = get_logger("sedd.test.rank0", log_file)
    logger = get_logger("sedd.test.rank0", log_file)  # twice: no duplicated handlers
    logger.info("hello %d", 7)
    out = capsys.readouterr().out
    assert out.count("hello 7") == 1
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO", out)
    assert "hello 7" in log_file.read_text()


def test_get_logger_other_rank(clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    clean_env.setenv("RANK", "1")
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("MASTER_ADDR", "127.0.0.1")
    clean_env.setenv("MASTER_PORT", "1")
    logger = get_logger("sedd.test.rank1")
    logger.info("quiet")
    logger.warning("loud")
    out = capsys.readouterr().out
    assert "quiet" not in out and "[rank 1]" in out and "loud" in out
    assert logger.level == logging.WARNING


# ---------------------------------------------------------------------------- seeds and RNG


def _draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_set_seed_is_deterministic_and_rank_dependent() -> None:
    set_seed(42)
    first = _draws()
    set_seed(42)
    assert _draws() == first
    set_seed(42, rank=1)
    assert _draws() != first


def test_rng_state_round_trip(tmp_path: Path) -> None:
    set_seed(0)
    _draws()
    state = rng_state()
    expected = _draws()
    _draws()
    torch.save(state, tmp_path / "rng.pth")  # survives a checkpoint round trip
    set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=False))
    assert _draws() == expected


def test_set_rng_state_missing_key() -> None:
    with pytest.raises(KeyError, match="numpy"):
        set_rng_state({"python": random.getstate(), "torch": torch.get_rng_state()})


# ---------------------------------------------------------------------------- devices, models, paths


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    with pytest.raises(ValueError, match="Unknown device"):
        resolve_device("banana")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resolve_device_cuda_unavailable() -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available.*device=cpu"):
        resolve_device("cuda")


def test_count_parameters() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=True))
    assert count_parameters(model) == 40 + 40 + 10
    model[1].weight = model[0].weight  # tied weights count once
    assert count_parameters(model) == 40 + 10
    model[1].bias.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 40


def test_check_writable_dir(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    assert check_writable_dir(target) == target and target.is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match=re.escape(str(blocker / "sub"))):
        check_writable_dir(blocker / "sub")
