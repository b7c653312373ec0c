"""Atomic, rotating training checkpoints.

Layout of a run directory (the same as the original SEDD repo)::

    run_dir/checkpoints-meta/checkpoint.pth     # latest state, what a restarted run resumes from
    run_dir/checkpoints/checkpoint_{step}.pth   # numbered snapshots, the newest ``keep_last`` kept

Every file is written to a temporary name in the same directory, flushed, fsynced and renamed
over the final name with ``os.replace``, so a crash, a SIGKILL or a full disk leaves the previous
file untouched: a run never loses more than the work since its last save and never leaves a
checkpoint it cannot read. :func:`load_checkpoint` still checks each file and falls back to older
snapshots when one is damaged (e.g. copied by hand, or a disk that lied about fsync).

Only rank 0 should save. Checkpoints hold optimizer states, RNG states (numpy arrays, Python
tuples) and plain Python values, so they are loaded with ``torch.load(weights_only=False)``, which
can run arbitrary code from the file: load only checkpoints that this code wrote, never files from
an untrusted source.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = [
    "CheckpointError",
    "atomic_torch_save",
    "save_checkpoint",
    "load_checkpoint",
    "list_snapshots",
    "snapshot_dir",
    "meta_checkpoint_path",
]

logger = logging.getLogger(__name__)

SNAPSHOT_DIRNAME = "checkpoints"
META_DIRNAME = "checkpoints-meta"
META_FILENAME = "checkpoint.pth"
_SNAPSHOT_RE = re.compile(r"checkpoint_(\d+)\.pth")
_TEMP_RE = re.compile(r"\..+\.tmp-(\d+)")
_COPY_CHUNK = 16 * 1024 * 1024


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or no checkpoint of a run could be read."""


def snapshot_dir(run_dir: str | os.PathLike[str]) -> Path:
    """``run_dir/checkpoints``: where the numbered snapshots live."""
    return Path(run_dir) / SNAPSHOT_DIRNAME


def meta_checkpoint_path(run_dir: str | os.PathLike[str]) -> Path:
    """``run_dir/checkpoints-meta/checkpoint.pth``: the checkpoint a restarted run resumes from."""
    return Path(run_dir) / META_DIRNAME / META_FILENAME


# --------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable. Skipped where directories cannot be fsynced."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # not supported by this filesystem
            raise
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` through ``write(file)`` via temp file + fsync + ``os.replace`` + directory fsync."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    had_previous = path.exists()
    replaced = False
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        replaced = True
        _fsync_dir(path.parent)
    except Exception as err:
        if replaced:
            raise CheckpointError(
                f"Wrote {path}, but syncing its directory failed ({err}); the file may not survive a "
                "power loss. Check the filesystem holding the run directory."
            ) from err
        previous = f"the previous {path.name} is intact" if had_previous else f"no {path.name} was written"
        reason = (
            "the disk is full; free space or choose another run directory"
            if (isinstance(err, OSError) and err.errno == errno.ENOSPC)
            else f"{type(err).__name__}: {err}"
        )
        raise CheckpointError(f"Could not save checkpoint {path} ({reason}); {previous}.") from err
    finally:
        if not replaced:
            tmp.unlink(missing_ok=True)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)`` that either fully replaces ``path`` or leaves it untouched.

    Writes ``.<name>.tmp-<pid>`` next to ``path``, fsyncs it, renames it over ``path`` and fsyncs
    the directory. On any error the temp file is removed and :class:`CheckpointError` is raised.
    """
    return _atomic_write(Path(path), lambda f: torch.save(obj, f))


def _atomic_copy(src: Path, dst: Path) -> Path:
    def write(f: BinaryIO) -> None:
        with open(src, "rb") as source:
            shutil.copyfileobj(source, f, _COPY_CHUNK)

    return _atomic_write(dst, write)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_temps(directory: Path) -> None:
    """Delete temp files left by saves of processes that died (e.g. SIGKILL) on this host."""
    if os.name == "nt" or not directory.is_dir():
        return
    for entry in directory.iterdir():
        match = _TEMP_RE.fullmatch(entry.name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and not _pid_alive(pid):
            logger.info("Removing temp file %s left by an interrupted save", entry)
            entry.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------


def list_snapshots(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Numbered snapshots ``run_dir/checkpoints/checkpoint_{step}.pth``, sorted by step (oldest first)."""
    directory = snapshot_dir(run_dir)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _SNAPSHOT_RE.fullmatch(entry.name)
        if match is not None and entry.is_file():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def _snapshot_step(path: Path) -> int:
    match = _SNAPSHOT_RE.fullmatch(path.name)
    assert match is not None, path
    return int(match.group(1))


def save_checkpoint(
    state: Mapping[str, Any],
    run_dir: str | os.PathLike[str],
    step: int,
    keep_last: int | None = 3,
    snapshot: bool = True,
) -> Path:
    """Save ``state`` as the run's meta checkpoint and (if ``snapshot``) numbered snapshot ``step``.

    ``state`` is a dict of state dicts, e.g. ``{"model", "optimizer", "ema", "step", ...}`` as in the
    original repo. The meta checkpoint is written first and the snapshot is an atomic copy of it,
    so the meta checkpoint is never older than the newest snapshot; then snapshots beyond the
    newest ``keep_last`` are deleted (never the one just written; ``None`` keeps all).
    ``snapshot=False`` updates only the meta checkpoint (frequent saves for preemption).

    Returns the snapshot's path, or the meta checkpoint's path when ``snapshot=False``.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None (keep all), got {keep_last}.")
    if int(step) != step or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}.")
    step = int(step)
    meta = meta_checkpoint_path(run_dir)
    snapshots = snapshot_dir(run_dir)
    _remove_stale_temps(meta.parent)
    _remove_stale_temps(snapshots)

    atomic_torch_save(dict(state), meta)
    if not snapshot:
        return meta

    path = _atomic_copy(meta, snapshots / f"checkpoint_{step}.pth")
    if keep_last is not None:
        others = [p for p in list_snapshots(run_dir) if p != path]
        others.sort(key=_snapshot_step, reverse=True)
        for old in others[keep_last - 1 :]:
            try:
                old.unlink(missing_ok=True)
            except OSError as err:
                raise CheckpointError(
                    f"Saved {path}, but could not delete the old snapshot {old} ({err}); fix the "
                    "permissions of the run directory or delete it by hand."
                ) from err
    return path


_LOAD_ERRORS = (
    RuntimeError,  # torch: "PytorchStreamReader failed reading zip archive" (truncated file)
    pickle.UnpicklingError,
    EOFError,
    OSError,
    ValueError,
    ImportError,  # pickled class no longer importable
    AttributeError,
)


def load_checkpoint(
    run_dir: str | os.PathLike[str],
    map_location: str | torch.device | None = "cpu",
    validate: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], Path] | None:
    """Load the newest readable checkpoint of ``run_dir``.

    Tries the meta checkpoint, then the numbered snapshots newest first. A file that cannot be read
    (truncated, not a checkpoint, or ``validate(state)`` raising ``ValueError``, e.g. for shapes or a
    vocabulary that do not match the model) is skipped with a WARNING naming it and the reason.

    Uses ``torch.load(weights_only=False)``: only load checkpoints written by this code.

    Returns:
        ``(state, path)``, or ``None`` when the run has no checkpoint yet.

    Raises:
        CheckpointError: checkpoints exist but none can be read.
    """
    meta = meta_checkpoint_path(run_dir)
    candidates = ([meta] if meta.is_file() else []) + list_snapshots(run_dir)[::-1]
    if not candidates:
        return None

    failures: list[str] = []
    for path in candidates:
        try:
            state = torch.load(path, map_location=map_location, weights_only=False)
        except _LOAD_ERRORS as err:
            reason = f"cannot be read ({type(err).__name__}: {err})"
        else:
            if not isinstance(state, dict):
                reason = f"holds a {type(state).__name__}, not a checkpoint dict"
            else:
                try:
                    if validate is not None:
                        validate(state)
                except ValueError as err:
                    reason = f"does not fit this run ({err})"
                else:
                    if failures:
                        logger.warning("Resuming from %s instead (newest readable checkpoint).", path)
                    return state, path
        failures.append(f"{path}: {reason}")
        logger.warning("Skipping checkpoint %s: it %s; trying the next one.", path, reason)

    raise CheckpointError(
        f"None of the {len(candidates)} checkpoints in {Path(run_dir)} can be used:\n  "
        + "\n  ".join(failures)
        + "\nFix the cause above, or move the run directory away to start from scratch."
    )
