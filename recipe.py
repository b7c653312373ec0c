"""What every training entrypoint (sft.py, train.py, run_rl.py) does the same way: config resolvers, launch
(one process, local DDP workers, torchrun or SLURM), resume config, logging, preemption, the step loop,
checkpoints and the hub-format export.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

import utils
from checkpoint import load_checkpoint, save_checkpoint
from model.ema import ExponentialMovingAverage
from training import StepResult, TrainState, optimizer_from_config, prepare_model, validate_checkpoint_for

RUN_CONFIG_NAME = "run_config.yaml"
EXPORT_DIR = "hf_model"


# ----------------------------------------------------------------------------- config
def _run_dir(load_dir: str | None, default: str) -> str:
    return str(load_dir) if load_dir not in (None, "", "None", "null") else default


def _dataset_tag(name: str) -> str:
    """Run-directory tag of a dataset: a hub id as is (`org/name`), a local path by its file or folder name."""
    path = Path(str(name))
    if path.exists() or str(name).startswith((".", "/", "~")):
        return path.stem or path.name
    return str(name)


def register_resolvers() -> None:
    """`${run_dir:load_dir,default}` and `${dataset_tag:name}`, used by the entrypoints' hydra.run.dir."""
    for name, fn in (("run_dir", _run_dir), ("dataset_tag", _dataset_tag)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def resume_config(cfg: DictConfig) -> DictConfig:
    """With `load_dir`, continue that run's saved config; plain `key=value` overrides of this command apply on top."""
    if not cfg.get("load_dir"):
        return cfg
    saved = Path(cfg.load_dir) / RUN_CONFIG_NAME
    if not saved.is_file():
        raise FileNotFoundError(
            f"load_dir={cfg.load_dir} is not a run directory of this suite ({saved} is missing). "
            "To start from a model, use sft.pretrained_model=<path> instead."
        )
    resumed = OmegaConf.load(saved)
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not running under Hydra (tests call the recipe directly)
        overrides = []
    for override in overrides:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if key == "load_dir" or "/" in key or "." not in key and key in ("model", "optim", "experiment"):
            continue
        OmegaConf.update(resumed, key, yaml.safe_load(value), force_add=True)
    resumed.load_dir = cfg.load_dir
    resumed.work_dir = str(cfg.load_dir)
    return resumed


def check_batch_layout(batch_size: int, accum: int, world_size: int) -> int:
    """Per-process micro-batch size; the global batch must split evenly over processes and accumulation."""
    if batch_size % (world_size * accum):
        raise ValueError(
            f"training.batch_size={batch_size} is not divisible by ngpus * training.accum = {world_size} * {accum}; "
            "choose a batch size that is a multiple of their product."
        )
    return batch_size // (world_size * accum)


def check_gpus(ngpus: int, device: str) -> None:
    if ngpus > 1 and device != "cpu":
        available = torch.cuda.device_count()
        if available < ngpus:
            raise ValueError(
                f"ngpus={ngpus} but {available} CUDA device(s) are visible. Set ngpus={max(available, 1)} "
                "(or device=cpu to run the workers on the CPU with gloo)."
            )


# ----------------------------------------------------------------------------- errors
class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row."""


def user_errors_exit(main: Callable[[DictConfig], None]) -> Callable[[DictConfig], None]:
    """Wrap an entrypoint: problems the user can fix (bad config, missing path or field, unreachable hub,
    unreadable checkpoint, diverged run) end with their one-paragraph message and exit code 1, no traceback.
    Set SEDD_TRACEBACK=1 to see the traceback."""
    from checkpoint import CheckpointError

    fixable = (
        ValueError,
        FileNotFoundError,
        ConnectionError,
        PermissionError,
        CheckpointError,
        NonFiniteLossError,
    )

    @functools.wraps(main)
    def wrapped(cfg: DictConfig) -> None:
        try:
            main(cfg)
        except fixable as err:
            if os.environ.get("SEDD_TRACEBACK"):
                raise
            print(f"Error: {err}\n(set SEDD_TRACEBACK=1 for the traceback)", file=sys.stderr)
            raise SystemExit(1) from err

    return wrapped


def preflight_output_dir(argv: list[str]) -> None:
    """Before Hydra creates the run directory: fail with a clear message when `hydra.run.dir=...` of the
    command line cannot be created (Hydra itself would fail with a traceback)."""
    targets = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    if not targets or "${" in targets[-1]:
        return
    path = Path(targets[-1]).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(
            f"Error: cannot create the run directory {path} ({err.strerror}). Choose a writable location with "
            "hydra.run.dir=<path>.",
            file=sys.stderr,
        )
        raise SystemExit(1) from err


# ----------------------------------------------------------------------------- launch
def launch(cfg: DictConfig, worker: Callable[[DictConfig], Any]) -> None:
    """Run `worker(cfg)` in this process, or in `ngpus` local DDP workers when not already launched by
    torchrun or SLURM. A single process never creates a process group."""
    info = utils.detect_launch()
    if info is None and cfg.ngpus > 1:
        check_gpus(cfg.ngpus, cfg.device)
        utils.spawn_local_workers(_distributed_worker, cfg.ngpus, (OmegaConf.to_container(cfg), worker))
        return
    if info is None:
        worker(cfg)
        return
    _run_distributed(info, cfg, worker)


def _distributed_worker(cfg_dict: dict, worker: Callable[[DictConfig], Any]) -> None:
    info = utils.detect_launch()
    _run_distributed(info, OmegaConf.create(cfg_dict), worker)


def _run_distributed(info, cfg: DictConfig, worker: Callable[[DictConfig], Any]) -> None:
    if cfg.device == "cpu":
        info = dataclasses.replace(info, device=torch.device("cpu"))  # keeps the launcher's address and port
    utils.init_distributed(info)
    try:
        worker(cfg)
    finally:
        utils.cleanup_distributed()


def save_run_config(cfg: DictConfig, run_dir: Path) -> None:
    """The run's resolved config, written once (a resumed run keeps its original)."""
    path = run_dir / RUN_CONFIG_NAME
    if utils.is_main_process() and not path.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")


# ----------------------------------------------------------------------------- preemption
class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 (SLURM's warnings) and SIGUSR2 (submitit's timeout/preemption signal): the loop
    saves at the next step boundary, then hands the signal to the handler that was installed before
    (submitit's, which requeues the job on SIGUSR2) and stops."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def is_set(self) -> bool:
        """True on every process once any process got a signal."""
        flag = torch.tensor(float(self.signal is not None))
        return bool(utils.all_reduce_mean(flag) > 0)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def forward(self) -> None:
        """After the save: restore the earlier handlers and call the one for the received signal, if any."""
        self.restore()
        handler = self.previous.get(self.signal)
        if callable(handler):
            handler(self.signal, None)


# ----------------------------------------------------------------------------- logging
class MetricsLogger:
    """Log lines on rank 0, TensorBoard scalars, and wandb when asked."""

    def __init__(self, run_dir: Path, logger, tensorboard: bool, wandb_project: str | None, config: dict):
        self.logger = logger
        self.tb = None
        self.wandb = None
        if not utils.is_main_process():
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise ImportError("logging.wandb=True needs `pip install wandb`.") from err
            self.wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=config, resume="allow")

    def log(self, step: int, metrics: dict[str, float], prefix: str) -> None:
        if not utils.is_main_process():
            return
        text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        self.logger.info(f"step {step} {prefix}: {text}")
        for key, value in metrics.items():
            if self.tb is not None:
                self.tb.add_scalar(f"{prefix}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


# ----------------------------------------------------------------------------- training state
def build_train_state(
    model: torch.nn.Module, cfg: DictConfig, precision: str, distributed: bool, run_dir: Path, logger
) -> tuple[TrainState, torch.nn.Module]:
    """An entrypoint's training state and the module its step calls.

    The state: `cfg.optim`'s optimizer and schedule over the trainable parameters, their EMA
    (`cfg.training.ema`) and a GradScaler for fp16, resumed from `run_dir`'s newest checkpoint when there is
    one. The module: `training.prepare_model` with `cfg.training`'s activation checkpointing and compile, in
    DDP when `distributed`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_from_config(params, cfg.optim, cfg.training.n_iters)
    state = TrainState(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        ema=ExponentialMovingAverage(params, decay=cfg.training.ema),
        scaler=torch.amp.GradScaler("cuda") if precision == "fp16" else None,
    )
    resume_state(state, run_dir, logger)
    forward_model = prepare_model(
        model,
        activation_checkpointing=cfg.training.activation_checkpointing,
        compile=cfg.training.compile,
        distributed=distributed,
    )
    return state, forward_model


# ----------------------------------------------------------------------------- checkpoints
def resume_state(state: TrainState, run_dir: Path, logger) -> bool:
    """Load the newest readable checkpoint of `run_dir` into `state`; False when the run has none."""
    found = load_checkpoint(run_dir, map_location="cpu", validate=validate_checkpoint_for(state.model))
    if found is None:
        return False
    checkpoint, path = found
    state.load_state_dict(checkpoint)
    logger.info(f"Resumed from {path} at step {state.step}")
    return True


def export_hub_model(state: TrainState, run_dir: Path, extra_files: dict[str, dict] | None = None) -> Path:
    """Write the EMA weights in hub format to `run_dir/hf_model` (replaced atomically); loadable by
    `SEDD.from_pretrained`, `load_model` and `sft.pretrained_model`."""
    target = run_dir / EXPORT_DIR
    staging = run_dir / f".{EXPORT_DIR}.tmp-{os.getpid()}"
    params = [p for p in state.model.parameters() if p.requires_grad]
    with state.ema.average_parameters(params):
        state.model.save_pretrained(staging)
    for name, content in (extra_files or {}).items():
        (staging / name).write_text(json.dumps(content, indent=2), encoding="utf-8")
    old = run_dir / f".{EXPORT_DIR}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def save_all(state: TrainState, run_dir: Path, keep_last: int, numbered: bool, extra_files=None) -> None:
    """Rank 0 writes the resume checkpoint (and, when `numbered`, keeps it as a snapshot and exports)."""
    if utils.is_main_process():
        save_checkpoint(state.state_dict(), run_dir, state.step, keep_last=keep_last, snapshot=numbered)
        if numbered:
            export_hub_model(state, run_dir, extra_files)
    utils.barrier()


# ----------------------------------------------------------------------------- the loop
@dataclass
class LoopConfig:
    n_iters: int
    log_freq: int
    eval_freq: int
    snapshot_freq: int
    snapshot_freq_for_preemption: int
    keep_last: int
    max_nonfinite: int


def run_loop(
    state: TrainState,
    loop: LoopConfig,
    run_dir: Path,
    step_fn: Callable[[TrainState], StepResult],
    eval_fn: Callable[[TrainState], dict[str, float]] | None,
    metrics: MetricsLogger,
    logger,
    extra_files: Callable[[], dict[str, dict]] | None = None,
) -> str:
    """Train until `loop.n_iters` updates; returns 'done' or 'preempted'. Saves on preemption and at the end."""
    preempt = PreemptionFlag()
    files = extra_files or (lambda: {})
    bar = tqdm(
        total=loop.n_iters,
        initial=state.step,
        desc="train",
        disable=not utils.is_main_process(),
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30,  # a redirected log gets a line every 30 s
    )
    try:
        window: list[StepResult] = []
        tick = time.perf_counter()
        while state.step < loop.n_iters:
            result = step_fn(state)
            if result.skipped:
                logger.warning(
                    f"step {state.step}: non-finite loss/gradient ({result.loss}, {result.grad_norm}); update skipped "
                    f"({state.nonfinite_in_row} in a row, {state.nonfinite_total} in total)"
                )
                if state.nonfinite_in_row >= loop.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{state.nonfinite_in_row} non-finite losses in a row at step {state.step}; stopping. The last "
                        f"good checkpoint is in {run_dir / 'checkpoints-meta'}. Lower optim.lr or check the data."
                    )
                continue
            window.append(result)
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.4f}")
            step = state.step
            if step % loop.log_freq == 0 or step == loop.n_iters:
                elapsed = time.perf_counter() - tick
                tokens = sum(r.n_scored for r in window)
                metrics.log(
                    step,
                    {
                        "loss": sum(r.loss * r.n_scored for r in window) / max(tokens, 1),
                        "grad_norm": sum(r.grad_norm for r in window) / len(window),
                        "lr": window[-1].lr,
                        "scored_tokens_per_s": tokens / max(elapsed, 1e-9),
                    },
                    "train",
                )
                window, tick = [], time.perf_counter()
            if eval_fn is not None and (step % loop.eval_freq == 0 or step == loop.n_iters):
                metrics.log(step, eval_fn(state), "eval")
            if step % loop.snapshot_freq == 0 or step == loop.n_iters:
                save_all(state, run_dir, loop.keep_last, numbered=True, extra_files=files())
            elif step % loop.snapshot_freq_for_preemption == 0:
                save_all(state, run_dir, loop.keep_last, numbered=False)
            if preempt.is_set():
                save_all(state, run_dir, loop.keep_last, numbered=False)
                logger.info(
                    f"Signal {preempt.signal} received: saved step {step} to {run_dir}; exiting to be resumed."
                )
                preempt.forward()
                return "preempted"
        return "done"
    finally:
        bar.close()
        preempt.restore()


def batch_stream(sampler, per_rank_batch: int, state: TrainState) -> Iterator[list[int]]:
    """This process's dataset indices for each step, endlessly over epochs, starting at the state's data
    position (`epoch`, `batches_in_epoch`) and advancing it, so that a resumed run sees the same data."""
    while True:
        sampler.set_epoch(state.epoch)
        indices = list(sampler)
        n_batches = len(indices) // per_rank_batch
        if n_batches == 0:
            raise ValueError(
                f"The training set gives {len(indices)} examples per process, fewer than one batch of "
                f"{per_rank_batch}; lower training.batch_size or add data."
            )
        while state.batches_in_epoch < n_batches:
            start = state.batches_in_epoch * per_rank_batch
            state.batches_in_epoch += 1
            yield indices[start : start + per_rank_batch]
        state.epoch += 1
        state.batches_in_epoch = 0


def split_micro(indices: list[int], accum: int) -> list[list[int]]:
    size = len(indices) // accum
    return [indices[i * size : (i + 1) * size] for i in range(accum)]


def summarize(value: float) -> float:
    return float(value) if math.isfinite(value) else float("nan")
