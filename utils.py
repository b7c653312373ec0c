"""Shared helpers: distributed setup, logging, seeding/RNG state, devices and paths.

Library code: every function takes explicit arguments and never reads the Hydra config.

Distributed runs follow one code path whatever launched them::

    info = detect_launch()          # torchrun env, SLURM env, or None for one process
    if info is not None:
        init_distributed(info)
    ...                             # is_main_process(), all_reduce_mean(), barrier() work either way
    cleanup_distributed()

With one process no process group is created and the collective helpers are no-ops.
``spawn_local_workers`` starts N local processes (``ngpus=N`` without torchrun/SLURM); each worker
gets the torchrun environment variables, so it takes the same ``detect_launch`` path.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "detect_launch",
    "init_distributed",
    "cleanup_distributed",
    "spawn_local_workers",
    "is_main_process",
    "get_rank",
    "get_world_size",
    "barrier",
    "all_reduce_mean",
    "broadcast_object",
    "get_logger",
    "set_seed",
    "rng_state",
    "set_rng_state",
    "resolve_device",
    "count_parameters",
    "check_writable_dir",
]

# --------------------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    """Where this process sits in a multi-process run.

    ``master_addr``/``master_port`` are the rendezvous address used by :func:`init_distributed`.
    """

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


def _int_env(env: Mapping[str, str], key: str) -> int:
    value = env[key]
    try:
        return int(value)
    except ValueError as err:
        raise ValueError(
            f"Environment variable {key}={value!r} is not an integer; fix the launcher."
        ) from err


def _device_for_local_rank(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def _first_host(nodelist: str) -> str:
    """First host of a SLURM nodelist, e.g. ``node[01-04],gpu7`` -> ``node01``.

    Uses ``scontrol show hostnames`` when available, else parses the compact form.
    """
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        try:
            out = subprocess.run(
                [scontrol, "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            ).stdout.split()
        except (OSError, subprocess.SubprocessError):
            out = []
        if out:
            return out[0]
    return _parse_first_host(nodelist)


def _parse_first_host(nodelist: str) -> str:
    """Parse the first host of a compact SLURM nodelist without ``scontrol``."""
    # First top-level item: split on commas that are not inside brackets.
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            end = i
            break
    item = nodelist[:end].strip()

    # Each bracket group "[01-04,07]" is replaced by its first value "01".
    def first_of_group(match: re.Match[str]) -> str:
        return match.group(1).split(",")[0].split("-")[0].strip()

    host = re.sub(r"\[([^\]]*)\]", first_of_group, item)
    if not host or "[" in host or "]" in host:
        raise ValueError(
            f"Cannot parse SLURM_JOB_NODELIST={nodelist!r}; set MASTER_ADDR to the first node's hostname."
        )
    return host


def _port_from_job_id(job_id: str | None) -> int:
    """A deterministic port in [15000, 35000) so all tasks of one job agree without talking."""
    if job_id is None:
        return 29500
    digits = re.sub(r"\D", "", job_id)[-8:]  # array jobs look like "1234_5"
    return 15000 + int(digits or "0") % 20000


def detect_launch(env: Mapping[str, str] | None = None) -> DistInfo | None:
    """Read the launcher's environment; return ``None`` for a single-process run.

    Checks torchrun (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``)
    first, then SLURM ``srun`` tasks (``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``;
    ``MASTER_ADDR`` from the first host of ``SLURM_JOB_NODELIST`` unless set, ``MASTER_PORT`` from
    the environment or derived from ``SLURM_JOB_ID``). A world size of 1 counts as single process.

    Args:
        env: environment to read; ``os.environ`` by default (tests pass a dict).
    """
    env = os.environ if env is None else env

    if "RANK" in env and "WORLD_SIZE" in env:
        world_size = _int_env(env, "WORLD_SIZE")
        if world_size <= 1:
            return None
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            raise RuntimeError(
                f"RANK/WORLD_SIZE are set but {', '.join(missing)} is not; launch with torchrun "
                "or export MASTER_ADDR and MASTER_PORT."
            )
        rank = _int_env(env, "RANK")
        local_rank = _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        return DistInfo(
            rank=rank,
            local_rank=local_rank,
            world_size=world_size,
            device=_device_for_local_rank(local_rank),
            master_addr=env["MASTER_ADDR"],
            master_port=_int_env(env, "MASTER_PORT"),
        )

    if "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        # srun sets SLURM_STEP_NUM_TASKS for the step; it is the more precise count when present.
        ntasks_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        world_size = _int_env(env, ntasks_key)
        if world_size <= 1:
            return None
        rank = _int_env(env, "SLURM_PROCID")
        local_rank = _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        if env.get("MASTER_ADDR"):
            master_addr = env["MASTER_ADDR"]
        elif env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST"):
            master_addr = _first_host(env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"])
        else:
            raise RuntimeError(
                "SLURM_JOB_NODELIST is not set; export MASTER_ADDR to the first node's hostname."
            )
        if env.get("MASTER_PORT"):
            master_port = _int_env(env, "MASTER_PORT")
        else:
            master_port = _port_from_job_id(env.get("SLURM_JOB_ID"))
        return DistInfo(
            rank=rank,
            local_rank=local_rank,
            world_size=world_size,
            device=_device_for_local_rank(local_rank),
            master_addr=master_addr,
            master_port=master_port,
        )

    return None


def init_distributed(info: DistInfo, backend: str | None = None) -> None:
    """Create the default process group for ``info``; no-op if one already exists.

    Args:
        info: from :func:`detect_launch`.
        backend: ``None`` picks ``nccl`` for CUDA devices and ``gloo`` for CPU.
    """
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if info.device.type == "cuda" else "gloo"
    if info.device.type == "cuda":
        if info.device.index is not None and info.device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {info.local_rank} needs {info.device} but only {torch.cuda.device_count()} "
                "CUDA devices are visible; launch at most one process per GPU."
            )
        torch.cuda.set_device(info.device)
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{info.master_addr}:{info.master_port}",
        rank=info.rank,
        world_size=info.world_size,
        device_id=info.device if info.device.type == "cuda" else None,
    )


def cleanup_distributed() -> None:
    """Destroy the default process group if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _local_worker(local_rank: int, fn: Callable[..., Any], nprocs: int, port: int, args: tuple) -> None:
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(nprocs),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    fn(*args)


def spawn_local_workers(fn: Callable[..., Any], nprocs: int, args: tuple = ()) -> None:
    """Run ``fn(*args)`` in ``nprocs`` local processes (``nprocs == 1``: in this process).

    Each worker gets ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` as torchrun
    would set them, so ``fn`` calls :func:`detect_launch` like any other launch. ``fn`` and ``args``
    must be picklable (a module-level function). Raises if any worker fails.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}.")
    if nprocs == 1:
        fn(*args)
        return
    torch.multiprocessing.spawn(
        _local_worker, args=(fn, nprocs, _free_port(), tuple(args)), nprocs=nprocs, join=True
    )


def _dist_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank; 0 without a process group."""
    return dist.get_rank() if _dist_active() else 0


def get_world_size() -> int:
    """Number of processes; 1 without a process group."""
    return dist.get_world_size() if _dist_active() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single-process run)."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for all ranks; no-op without a process group."""
    if _dist_active():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average a floating-point tensor over ranks, in place; returns it. No-op with one process."""
    if not _dist_active() or dist.get_world_size() == 1:
        return tensor
    if not tensor.is_floating_point():
        raise TypeError(f"all_reduce_mean needs a floating-point tensor, got {tensor.dtype}; cast it first.")
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    tensor.div_(dist.get_world_size())
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (picklable objects); identity with one process."""
    if not _dist_active() or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


# --------------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------------

_LOG_FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"
_LOG_DATEFMT = "%Y-%m-%d %H:%M:%S"


def _launch_rank() -> int:
    """Rank from the process group, else from the launcher's environment (before init)."""
    if _dist_active():
        return dist.get_rank()
    try:
        info = detect_launch()
    except (RuntimeError, ValueError):
        return 0
    return info.rank if info is not None else 0


def get_logger(name: str, log_file: str | os.PathLike[str] | None = None) -> logging.Logger:
    """A logger that writes time-stamped lines; rank 0 at INFO (stdout and ``log_file``), other ranks
    WARNING and above only (stdout, prefixed with the rank).

    Calling it again with the same name replaces the handlers it added, so it is safe to call twice.
    """
    rank = _launch_rank()
    logger = logging.getLogger(name)
    for handler in [h for h in logger.handlers if getattr(h, "_sedd_handler", False)]:
        logger.removeHandler(handler)
        handler.close()

    fmt = _LOG_FORMAT if rank == 0 else f"[rank {rank}] {_LOG_FORMAT}"
    formatter = logging.Formatter(fmt, datefmt=_LOG_DATEFMT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file is not None and rank == 0:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._sedd_handler = True  # type: ignore[attr-defined]
        logger.addHandler(handler)

    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False  # our handlers already print; avoid duplicates via root (e.g. Hydra's)
    return logger


# --------------------------------------------------------------------------------------------------
# Seeds and RNG state
# --------------------------------------------------------------------------------------------------


def set_seed(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch (CPU and all CUDA devices) with ``seed + rank``."""
    value = int(seed) + int(rank)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    """Capture all RNG states: ``{"python", "numpy", "torch", "cuda"}`` (``cuda``: one per device)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore states captured by :func:`rng_state`.

    CUDA states are restored when CUDA is available; a checkpoint from a GPU run resumed on CPU
    restores the CPU generators only.
    """
    missing = [k for k in ("python", "numpy", "torch") if k not in state]
    if missing:
        raise KeyError(
            f"RNG state is missing {missing}; it must come from utils.rng_state() (got keys {sorted(state)})."
        )
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) != torch.cuda.device_count():
            raise ValueError(
                f"RNG state holds {len(cuda_states)} CUDA generators but {torch.cuda.device_count()} devices "
                "are visible; resume with the same CUDA_VISIBLE_DEVICES as the saved run."
            )
        torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8).cpu() for s in cuda_states])


# --------------------------------------------------------------------------------------------------
# Devices, models, paths
# --------------------------------------------------------------------------------------------------


def resolve_device(name: str | torch.device | None) -> torch.device:
    """Turn ``"auto"``/``None``/``"cpu"``/``"cuda"``/``"cuda:1"`` into a ``torch.device``.

    ``"auto"`` and ``None`` give CUDA when available, else CPU. Requesting CUDA without it raises.
    """
    if name is None or (isinstance(name, str) and name.strip().lower() == "auto"):
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name.strip() if isinstance(name, str) else name)
    except RuntimeError as err:
        raise ValueError(f"Unknown device {name!r}; use 'auto', 'cpu', 'cuda' or 'cuda:<index>'.") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device={name!r} was requested but CUDA is not available (torch {torch.__version__}, "
                f"built with CUDA {torch.version.cuda}); use device=cpu or device=auto."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device={name!r} was requested but only {torch.cuda.device_count()} CUDA devices are "
                "visible; pick an index below that or check CUDA_VISIBLE_DEVICES."
            )
    return device


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared/tied parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def check_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (with parents) and check that a file can be written there; return it.

    Raises ``OSError`` naming the path when it cannot be created or written.
    """
    directory = Path(path).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise OSError(
            f"Output directory {str(directory)!r} is not writable ({err.strerror or err}); "
            "choose another directory or fix its permissions."
        ) from err
    return directory
