"""Training machinery shared by sft.py, train.py and run_rl.py: state, optimizer, one step, evaluation.

Library code: explicit arguments, no Hydra config. The recipe scripts read their config and call these.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import utils
from graph_lib import Graph
from losses import LossTerms, score_entropy_loss
from model.ema import ExponentialMovingAverage
from noise_lib import Noise

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- precision
def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 on CUDA and fp32 elsewhere; any other value must be one of PRECISIONS."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(
            f"training.precision={precision!r} is not valid; choose auto, {', '.join(PRECISIONS)}."
        )
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("training.precision=fp16 needs CUDA; use bf16 or fp32 on CPU.")
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The one autocast context of a training step (a no-op in fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------- model wrapping
def prepare_model(
    model: nn.Module,
    *,
    activation_checkpointing: bool = False,
    compile: bool = False,
    compile_mode: str | None = None,
    distributed: bool = False,
) -> nn.Module:
    """The module the training step calls (`forward_model`); `model` itself stays the bare module.

    `activation_checkpointing` recomputes each transformer block in the backward pass (activation memory
    ~ one block instead of all); `compile` compiles each block in place with `torch.compile` (parameter and
    state-dict names unchanged), with torch.compile's `compile_mode` (None: its default; "reduce-overhead"
    replays each block as a CUDA graph); `distributed` wraps the model in DDP. Both options are off by
    default: measure them with benchmarks/bench.py (`--checkpointing`, `--compile`) before turning them on.
    """
    if activation_checkpointing:
        model.activation_checkpointing = True
    if compile:
        model.compile_blocks(compile_mode)
    return DistributedDataParallel(model) if distributed else model


# ----------------------------------------------------------------------------- optimizer
def build_optimizer(
    params: Sequence[nn.Parameter],
    name: str = "AdamW",
    lr: float = 3e-4,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """Adam or AdamW over `params`; `fused=None` uses the fused kernel where the device supports it."""
    optimizers = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}
    if name not in optimizers:
        raise ValueError(f"optim.optimizer={name!r} is not supported; choose one of {sorted(optimizers)}.")
    if fused is None:
        fused = all(p.device.type in ("cuda", "cpu") for p in params)
    return optimizers[name](
        params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, fused=fused or None
    )


def lr_lambda(warmup: int, n_iters: int, schedule: str = "constant", min_lr_ratio: float = 0.0) -> Callable:
    """Multiplier of the base lr after `step` updates: linear warmup (as the original SEDD), then constant
    or cosine decay to `min_lr_ratio`."""
    schedules = ("constant", "cosine")
    if schedule not in schedules:
        raise ValueError(f"optim.schedule={schedule!r} is not valid; choose one of {schedules}.")

    def multiplier(step: int) -> float:
        step = step + 1  # LambdaLR calls with the number of completed updates; the first update uses step 1
        if warmup > 0 and step < warmup:
            return step / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, n_iters - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def optimizer_from_config(
    params: Sequence[nn.Parameter], optim: Any, n_iters: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer and lr schedule of a run's `optim` config (configs/optim/adamw.yaml) over `n_iters`."""
    optimizer = build_optimizer(
        params,
        optim.optimizer,
        optim.lr,
        optim.beta1,
        optim.beta2,
        optim.eps,
        optim.weight_decay,
        optim.fused,
    )
    schedule = lr_lambda(optim.warmup, n_iters, optim.schedule, optim.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


# ----------------------------------------------------------------------------- state
@dataclass
class TrainState:
    """Everything a run needs to continue exactly: model, optimizer, schedule, EMA, scaler, step, data position
    and every RNG. `model` is the bare module (not the DDP wrapper)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: ExponentialMovingAverage
    scaler: torch.amp.GradScaler | None = None
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    def state_dict(self) -> dict[str, Any]:
        from model.config import to_container

        return {
            "model": self.model.state_dict(),
            "model_config": to_container(self.model.config),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict(),
            "ema_param_names": self.trainable_names(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "nonfinite_total": self.nonfinite_total,
            "rng": utils.rng_state(),
            "extra": self.extra,
        }

    def load_state_dict(self, state: dict[str, Any], restore_rng: bool = True) -> None:
        self.model.load_weights(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.ema.load_state_dict(state["ema"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.epoch = state.get("epoch", 0)
        self.batches_in_epoch = state.get("batches_in_epoch", 0)
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.extra = state.get("extra", {})
        if restore_rng and "rng" in state:
            utils.set_rng_state(state["rng"])


def validate_checkpoint_for(model: nn.Module) -> Callable[[dict[str, Any]], None]:
    """A checkpoint validator: shapes (and so the vocabulary) must match `model`; raises ValueError."""
    expected = {k: v.shape for k, v in model.state_dict().items()}

    def validate(state: dict[str, Any]) -> None:
        weights = state.get("model")
        if not isinstance(weights, dict):
            raise ValueError("no 'model' state dict in the checkpoint")
        for name, tensor in weights.items():
            name = name.removeprefix("module.")
            if name in expected and tuple(tensor.shape) != tuple(expected[name]):
                raise ValueError(
                    f"{name} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[name])} "
                    "(a different model size or vocabulary)"
                )

    return validate


# ----------------------------------------------------------------------------- noise draws
def _example_seed(seed: int, step: int, index: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + index * 104_729 + 0x5EDD) % (2**63 - 1)


@dataclass
class NoiseDraws:
    """Uniform draws that fix t and x_t of each example: u_t [B], u_move [B, L], u_token [B, L]."""

    u_t: torch.Tensor
    u_move: torch.Tensor
    u_token: torch.Tensor


def example_noise(
    indices: Sequence[int], length: int, seed: int, step: int, device: torch.device
) -> NoiseDraws:
    """Per-example draws seeded by (seed, step, dataset index): the same example gets the same t and x_t at
    a step whatever the batch layout, number of processes, accumulation split or padding. This makes
    1 x 4 accumulation equal 4 x 1, and 2-process DDP equal 1 process, exactly."""
    u_t, u_move, u_token = [], [], []
    for index in indices:
        gen = torch.Generator().manual_seed(_example_seed(seed, step, int(index)))
        u_t.append(torch.rand(1, generator=gen))
        u_move.append(torch.rand(length, generator=gen))
        u_token.append(torch.rand(length, generator=gen))
    return NoiseDraws(
        torch.cat(u_t).to(device), torch.stack(u_move).to(device), torch.stack(u_token).to(device)
    )


def perturb_from_draws(
    graph: Graph, noise: Noise, x0: torch.Tensor, scored: torch.Tensor, draws: NoiseDraws, sampling_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t [B], x_t [B, L]) from uniform draws, with the law of `graph.sample_transition` on scored positions."""
    t = (1 - sampling_eps) * draws.u_t + sampling_eps
    sigma, _ = noise(t)
    move = (draws.u_move < -torch.expm1(-sigma)[:, None]) & scored.bool()
    if graph.absorb:
        target = torch.full_like(x0, graph.dim - 1)
    else:
        target = (draws.u_token * graph.dim).long().clamp(max=graph.dim - 1)
    return t, torch.where(move, target, x0)


def batch_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    graph: Graph,
    noise: Noise,
    draws: NoiseDraws,
    sampling_eps: float = 1e-3,
    loss_kernel: str | None = None,
) -> LossTerms:
    """DWDSE of a collated batch (`input_ids`, `attention_mask`, `loss_mask`) under the given draws;
    `loss_kernel`: see `losses.absorbing_entropy_from_logits` (None: the device's default)."""
    x0 = batch["input_ids"]
    scored = batch["loss_mask"].bool() & batch["attention_mask"].bool()
    t, xt = perturb_from_draws(graph, noise, x0, scored, draws, sampling_eps)
    return score_entropy_loss(
        model,
        x0,
        graph,
        noise,
        loss_mask=scored,
        attention_mask=batch["attention_mask"],
        t=t,
        xt=xt,
        loss_kernel=loss_kernel,
    )


# ----------------------------------------------------------------------------- one step
@dataclass
class StepResult:
    loss: float  # nats per scored token over the global batch
    grad_norm: float
    lr: float
    n_scored: int  # scored tokens in the global batch
    skipped: bool  # non-finite loss or gradient: no update was made


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_step(
    state: TrainState,
    forward_model: nn.Module,
    micro_batches: Sequence[dict[str, torch.Tensor]],
    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], LossTerms],
    *,
    precision: str,
    device: torch.device,
    grad_clip: float,
) -> StepResult:
    """One optimizer update from this process's micro-batches (gradient accumulation).

    The objective is the sum of per-sequence DWDSE over the whole global batch (all micro-batches, all
    processes) divided by its number of scored tokens, so the update does not depend on how the global
    batch is split. `forward_model` is the DDP wrapper when distributed, else `state.model`.
    """
    world = utils.get_world_size()
    n_local = sum(
        int(mb["loss_mask"].bool().logical_and(mb["attention_mask"].bool()).sum()) for mb in micro_batches
    )
    n_global = int(round(float(utils.all_reduce_mean(torch.tensor(float(n_local), device=device))) * world))
    if n_global == 0:
        raise ValueError(
            "A training batch has no scored (response) tokens; check the dataset's response fields."
        )
    loss_sum = torch.zeros((), device=device)
    for i, mb in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = (
            contextlib.nullcontext()
            if last or not isinstance(forward_model, DistributedDataParallel)
            else forward_model.no_sync()
        )
        with sync:
            with autocast(precision, device):
                terms = loss_fn(forward_model, mb)
            loss = terms.per_sequence.sum() / n_global * world
            (state.scaler.scale(loss) if state.scaler is not None else loss).backward()
        loss_sum += terms.per_sequence.detach().sum()

    global_loss = float(utils.all_reduce_mean(loss_sum) * world / n_global)
    if state.scaler is not None:
        state.scaler.unscale_(state.optimizer)
    params = [p for p in state.model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    lr = state.optimizer.param_groups[0]["lr"]
    if not (math.isfinite(global_loss) and torch.isfinite(grad_norm)):
        state.optimizer.zero_grad(set_to_none=True)
        if state.scaler is not None:
            state.scaler.update()
        state.nonfinite_in_row += 1
        state.nonfinite_total += 1
        return StepResult(global_loss, float(grad_norm), lr, n_global, skipped=True)

    if state.scaler is not None:
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()
    state.ema.update(params)
    state.step += 1
    state.nonfinite_in_row = 0
    return StepResult(global_loss, float(grad_norm), lr, n_global, skipped=False)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_loss(
    state: TrainState,
    batches: Iterator[tuple[Sequence[int], dict[str, torch.Tensor]]],
    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor], Sequence[int]], LossTerms],
    *,
    precision: str,
    device: torch.device,
    use_ema: bool = True,
) -> float:
    """Mean DWDSE per scored token over `batches` of (dataset indices, batch), with EMA weights by default,
    reduced over processes. The caller fixes the draws so that successive evaluations are comparable."""
    model = state.model
    was_training = model.training
    model.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    context = state.ema.average_parameters(params) if use_ema else contextlib.nullcontext()
    with context:
        for indices, batch in batches:
            batch = to_device(batch, device)
            with autocast(precision, device):
                terms = loss_fn(model, batch, indices)
            total += torch.stack([terms.per_sequence.double().sum(), terms.n_scored.double().sum()])
    model.train(was_training)
    world = utils.get_world_size()
    total = utils.all_reduce_mean(total) * world
    return float(total[0] / total[1].clamp(min=1))
