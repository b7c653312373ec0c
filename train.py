"""Pretraining a SEDD discrete-diffusion language model from scratch, as in the original repository.

    python train.py                                   # SEDD-small on OpenWebText, validated on WikiText-103
    python train.py model=medium ngpus=8 training.batch_size=512
    python train.py graph=uniform noise=geometric model.scale_by_sigma=False
    python train.py experiment=train_demo             # offline CPU demo, a few minutes
    python train.py data.train=./corpus.txt data.valid=null model=tiny
    python train.py load_dir=exp_local/Skylion007/openwebtext/2024.01.15/120000    # resume
    python train.py -m hydra.launcher.partition=gpu ngpus=8                       # SLURM (submitit)

The corpus is tokenized with GPT-2, documents are joined with EOS and cut into blocks of `model.length`
tokens (`data.load_text_corpus` + `data.pack_tokens`); every token of a block is perturbed and scored with the
score-entropy loss. The run directory has the layout of sft.py's (`checkpoints/`, `checkpoints-meta/`, and
`hf_model/` with the EMA weights in hub format) and feeds `sft.pretrained_model`, `load_model` and
`run_sample.py --model_path`. Options: configs/train.yaml (`python train.py --cfg job` prints them).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from datasets import Dataset, DatasetDict
from omegaconf import DictConfig, OmegaConf

import data
import graph_lib
import noise_lib
import recipe
import utils
from generation import sample_canvases, write_jsonl
from likelihood import collate_blocks
from model import SEDD
from tokenizer import get_tokenizer
from training import (
    TrainState,
    batch_loss,
    evaluate_loss,
    example_noise,
    resolve_precision,
    to_device,
    train_step,
)

recipe.register_resolvers()
_VALID_SPLITS = ("validation", "valid", "test")


# ----------------------------------------------------------------------------- setup
def validate_config(cfg: DictConfig) -> None:
    """Cross-field checks, each error saying how to fix it."""
    if cfg.ngpus < 1:
        raise ValueError(f"ngpus={cfg.ngpus} must be at least 1.")
    if not cfg.data.train:
        raise ValueError(
            "data.train is not set; give a hub dataset or a local text file (data.train=./corpus.txt)."
        )
    if not cfg.data.valid and not 0 < cfg.data.valid_fraction < 1:
        raise ValueError(
            f"data.valid_fraction={cfg.data.valid_fraction} must be in (0, 1) when data.valid=null."
        )
    info = utils.detect_launch()
    world = info.world_size if info is not None else cfg.ngpus
    recipe.check_batch_layout(cfg.training.batch_size, cfg.training.accum, world)


def build_model(cfg: DictConfig) -> SEDD:
    """A fresh SEDD from the `model`, `graph` and `noise` groups (its config.json keeps the published layout)."""
    return SEDD(
        {
            "tokens": cfg.tokens,
            **{k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("graph", "noise", "model")},
        }
    )


def _only_or(dsd: DatasetDict, names: tuple[str, ...], what: str) -> Dataset:
    """The first split of `dsd` named in `names`, else its only split."""
    for name in names:
        if name in dsd:
            return dsd[name]
    if len(dsd) == 1:
        return next(iter(dsd.values()))
    raise ValueError(
        f"The {what} corpus has splits {list(dsd)} but none of {list(names)}; rename one of them."
    )


def build_corpora(cfg: DictConfig, tokenizer, block_size: int, logger) -> tuple[Dataset, Dataset]:
    """Packed train and validation blocks; rank 0 goes first so that the datasets cache is built once."""
    d = cfg.data
    if not utils.is_main_process():
        utils.barrier()
    corpus = data.load_text_corpus(d.train, d.text_field, d.cache_dir)
    if d.valid:
        train_raw = _only_or(corpus, ("train",), "training")
        valid_raw = _only_or(
            data.load_text_corpus(d.valid, d.text_field, d.cache_dir), _VALID_SPLITS, "validation"
        )
    else:
        train_raw, valid_raw = data.make_splits(corpus, valid_fraction=d.valid_fraction, seed=cfg.seed)
    pack = dict(tokenizer=tokenizer, block_size=block_size, text_field=d.text_field, num_proc=d.num_proc)
    train, valid = data.pack_tokens(train_raw, **pack), data.pack_tokens(valid_raw, **pack)
    if utils.is_main_process():
        utils.barrier()
    logger.info(
        f"Train: {len(train)} blocks of {block_size} tokens ({d.train}); validation: {len(valid)} blocks"
    )
    return train, valid


def block_batch(blocks: Dataset, indices: list[int], device: torch.device, seed: int, step: int) -> dict:
    """Blocks `indices` as a training batch on `device`, with their noise draws for `step`."""
    batch = to_device(collate_blocks(blocks, indices), device)
    batch["draws"] = example_noise(indices, batch["input_ids"].shape[1], seed, step, device)
    return batch


# ----------------------------------------------------------------------------- run
def run_train(cfg: DictConfig) -> str:
    run_dir = utils.check_writable_dir(cfg.work_dir)
    logger = utils.get_logger("train", run_dir / "train.log")
    recipe.save_run_config(cfg, run_dir)
    rank, world = utils.get_rank(), utils.get_world_size()
    cuda_rank = world > 1 and cfg.device != "cpu" and torch.cuda.is_available()
    device = utils.resolve_device(f"cuda:{torch.cuda.current_device()}" if cuda_rank else cfg.device)
    precision = resolve_precision(cfg.training.precision, device)
    utils.set_seed(cfg.seed, rank)
    logger.info(f"Run directory: {run_dir} | {world} process(es) on {device} | precision {precision}")

    tokenizer = get_tokenizer()
    if cfg.tokens != len(tokenizer):
        raise ValueError(
            f"tokens={cfg.tokens}, but the GPT-2 tokenizer has {len(tokenizer)}; set tokens={len(tokenizer)}."
        )
    model = build_model(cfg)
    graph = graph_lib.get_graph(model.config)
    noise = noise_lib.get_noise(model.config)
    train, valid = build_corpora(cfg, tokenizer, model.arch.length, logger)

    model.to(device).train()
    logger.info(f"Model: {utils.count_parameters(model) / 1e6:.1f}M parameters")
    state, forward_model = recipe.build_train_state(model, cfg, precision, world > 1, run_dir, logger)

    per_rank = cfg.training.batch_size // world
    micro = recipe.check_batch_layout(cfg.training.batch_size, cfg.training.accum, world)
    sampler = data.LengthGroupedSampler(
        [model.arch.length] * len(train),
        batch_size=per_rank,
        seed=cfg.seed,
        shuffle=True,
        num_replicas=world,
        rank=rank,
        group_by_length=False,
    )
    stream = recipe.batch_stream(sampler, per_rank, state)
    sampling_eps = cfg.training.sampling_eps

    def loss_fn(fwd, mb):
        return batch_loss(fwd, mb, graph, noise, mb["draws"], sampling_eps)

    def step_fn(st: TrainState):
        micro_batches = [
            block_batch(train, part, device, cfg.seed, st.step)
            for part in recipe.split_micro(next(stream), cfg.training.accum)
        ]
        return train_step(
            st,
            forward_model,
            micro_batches,
            loss_fn,
            precision=precision,
            device=device,
            grad_clip=cfg.optim.grad_clip,
        )

    eval_indices = list(range(rank, min(len(valid), cfg.training.eval_examples), world))

    def eval_batches():
        for start in range(0, len(eval_indices), micro):
            part = eval_indices[start : start + micro]
            yield part, block_batch(valid, part, device, cfg.seed + 1, 0)

    def eval_fn(st: TrainState) -> dict[str, float]:
        loss = evaluate_loss(
            st, eval_batches(), lambda m, b, _: loss_fn(m, b), precision=precision, device=device
        )
        if utils.is_main_process() and cfg.sampling.n_samples > 0:
            write_samples(st, graph, noise, tokenizer, cfg, run_dir, device, precision)
        utils.barrier()
        return {"loss": loss}

    metrics = recipe.MetricsLogger(
        run_dir,
        logger,
        cfg.logging.tensorboard,
        cfg.logging.wandb_project if cfg.logging.wandb else None,
        OmegaConf.to_container(cfg, resolve=True),
    )
    loop = recipe.LoopConfig(
        n_iters=cfg.training.n_iters,
        log_freq=cfg.training.log_freq,
        eval_freq=cfg.training.eval_freq,
        snapshot_freq=cfg.training.snapshot_freq,
        snapshot_freq_for_preemption=cfg.training.snapshot_freq_for_preemption,
        keep_last=cfg.training.keep_last,
        max_nonfinite=cfg.training.max_nonfinite,
    )
    if state.step == 0:
        metrics.log(0, eval_fn(state), "eval")
    try:
        outcome = recipe.run_loop(state, loop, run_dir, step_fn, eval_fn, metrics, logger)
    finally:
        metrics.close()
    if outcome == "done":
        logger.info(f"Done: {state.step} steps. Model (EMA weights): {run_dir / recipe.EXPORT_DIR}")
    return outcome


@torch.no_grad()
def write_samples(
    state: TrainState, graph, noise, tokenizer, cfg: DictConfig, run_dir: Path, device, precision
) -> None:
    """Unconditional samples of the EMA weights, to samples/step_<N>.jsonl (as the original's snapshot sampling)."""
    params = [p for p in state.model.parameters() if p.requires_grad]
    state.model.eval()
    with state.ema.average_parameters(params):
        tokens = sample_canvases(
            state.model,
            graph,
            noise,
            n=cfg.sampling.n_samples,
            length=state.model.arch.length,
            steps=cfg.sampling.steps,
            predictor=cfg.sampling.predictor,
            device=device,
            precision=precision,
            seed=cfg.seed,
        )
    state.model.train()
    texts = tokenizer.batch_decode(tokens.tolist())
    write_jsonl(
        run_dir / "samples" / f"step_{state.step}.jsonl", [{"step": state.step, "text": t} for t in texts]
    )


@hydra.main(version_base=None, config_path="configs", config_name="train")
@recipe.user_errors_exit
def main(cfg: DictConfig) -> None:
    cfg = recipe.resume_config(cfg)
    validate_config(cfg)
    recipe.launch(cfg, run_train)


if __name__ == "__main__":
    recipe.preflight_output_dir(sys.argv[1:])
    main()
