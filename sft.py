"""Supervised fine-tuning (SFT) of SEDD discrete-diffusion language models.

    python sft.py sft.pretrained_model=louaaron/sedd-small sft.dataset=simplescaling/s1K-1.1
    python sft.py experiment=demo                                  # offline CPU demo, a few minutes
    python sft.py ngpus=4 sft.pretrained_model=louaaron/sedd-medium sft.dataset=your-dataset
    python sft.py load_dir=exp_local/sft/your-dataset/2024.01.15/120000     # resume
    python sft.py -m sft.dataset=a,b hydra.launcher.partition=gpu           # SLURM (submitit)

Prompt tokens are never noised: they condition the model. Only response tokens (and the EOS) are
perturbed and scored with the score-entropy loss; padding is excluded from attention and loss.
Options: configs/sft.yaml (`python sft.py --cfg job` prints the composed config).
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import data
import graph_lib
import noise_lib
import recipe
import utils
from load_model import load_pretrained
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
SFT_CONFIG_FILE = "sft_config.json"


# ----------------------------------------------------------------------------- setup
def validate_config(cfg: DictConfig) -> None:
    """Cross-field checks, each error saying how to fix it."""
    sft = cfg.sft
    if (sft.thinking_field is None) != (sft.attempt_field is None):
        raise ValueError("sft.thinking_field and sft.attempt_field go together; set both or neither.")
    if sft.thinking_field is not None and sft.question_field is None:
        raise ValueError(
            "sft.thinking_field/attempt_field need sft.question_field (e.g. sft.question_field=question)."
        )
    if cfg.ngpus < 1:
        raise ValueError(f"ngpus={cfg.ngpus} must be at least 1.")
    info = utils.detect_launch()
    world = info.world_size if info is not None else cfg.ngpus
    recipe.check_batch_layout(cfg.training.batch_size, cfg.training.accum, world)
    if sft.max_length is not None and sft.max_length < 4:
        raise ValueError(f"sft.max_length={sft.max_length} is too small; use null for the model's length.")


def build_model(cfg: DictConfig) -> SEDD:
    """The pretrained model (hub id, hub-format directory or run directory), or a fresh one from `model`."""
    if cfg.sft.pretrained_model:
        return load_pretrained(cfg.sft.pretrained_model)
    run_config = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("graph", "noise", "model")}
    return SEDD({"tokens": cfg.tokens, **run_config})


def check_vocabulary(model: SEDD, tokenizer) -> None:
    if model.arch.tokens != len(tokenizer):
        raise ValueError(
            f"The model has {model.arch.tokens} tokens but the GPT-2 tokenizer has {len(tokenizer)}; "
            "SFT needs a model trained on the GPT-2 vocabulary (tokens: 50257)."
        )


def build_datasets(cfg: DictConfig, tokenizer, max_length: int, logger):
    """Load, split and tokenize; rank 0 goes first so that the datasets cache is built once."""
    sft = cfg.sft
    if not utils.is_main_process():
        utils.barrier()
    raw = data.load_raw_dataset(sft.dataset)
    train_raw, valid_raw = data.make_splits(raw, valid_fraction=sft.valid_fraction, seed=cfg.seed)
    spec = data.resolve_fields(
        train_raw.column_names,
        text_field=sft.text_field,
        question_field=sft.question_field,
        response_field=sft.response_field,
        thinking_field=sft.thinking_field,
        attempt_field=sft.attempt_field,
    )
    template = data.PromptTemplate(prompt=sft.prompt_template, thinking_response=sft.thinking_template)
    tokenize = partial(
        data.tokenize_sft_dataset,
        spec=spec,
        tokenizer=tokenizer,
        max_length=max_length,
        template=template,
        num_proc=sft.num_proc,
        truncate_response=sft.truncate_response,
    )
    train, train_report = tokenize(train_raw)
    valid, valid_report = tokenize(valid_raw)
    if utils.is_main_process():
        utils.barrier()
    logger.info(f"Fields: {spec}")
    logger.info(f"Train data: {train_report.summary()}")
    logger.info(f"Validation data: {valid_report.summary()}")
    return train, valid, spec, template


def fill_with_eos(batch: dict[str, torch.Tensor], eos_id: int) -> dict[str, torch.Tensor]:
    """LLaDA-style EOS padding: padding becomes EOS tokens that are attended to and scored as part of the
    response, so the model learns to end its answer and a fixed-length canvas can be sampled."""
    positions = torch.arange(batch["input_ids"].shape[1])[None]
    response = positions >= batch["prompt_len"][:, None]
    padding = batch["attention_mask"] == 0
    batch["input_ids"] = batch["input_ids"].masked_fill(padding, eos_id)
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    batch["loss_mask"] = response.to(batch["loss_mask"].dtype)
    batch["labels"] = batch["input_ids"].masked_fill(~response, data.IGNORE_INDEX)
    return batch


def sft_batch(dataset, indices, pad_id: int, pad_to: int | None, device, seed: int, step: int):
    """Collate dataset rows `indices` (EOS-filled to `pad_to` when given) with their noise draws for `step`."""
    batch = data.sft_collate([dataset[int(i)] for i in indices], pad_id=pad_id, pad_to=pad_to)
    if pad_to is not None:
        batch = fill_with_eos(batch, pad_id)
    batch = to_device(batch, device)
    batch["draws"] = example_noise(indices, batch["input_ids"].shape[1], seed, step, device)
    return batch


# ----------------------------------------------------------------------------- run
def run_sft(cfg: DictConfig) -> str:
    run_dir = utils.check_writable_dir(cfg.work_dir)
    logger = utils.get_logger("sft", run_dir / "train.log")
    recipe.save_run_config(cfg, run_dir)
    rank, world = utils.get_rank(), utils.get_world_size()
    device = utils.resolve_device(
        "cpu"
        if cfg.device == "cpu"
        else (
            f"cuda:{torch.cuda.current_device()}" if world > 1 and torch.cuda.is_available() else cfg.device
        )
    )
    precision = resolve_precision(cfg.training.precision, device)
    utils.set_seed(cfg.seed, rank)
    logger.info(f"Run directory: {run_dir} | {world} process(es) on {device} | precision {precision}")

    tokenizer = get_tokenizer()
    model = build_model(cfg)
    check_vocabulary(model, tokenizer)
    graph = graph_lib.get_graph(model.config)
    noise = noise_lib.get_noise(model.config)
    max_length = cfg.sft.max_length or model.arch.length
    if max_length > model.arch.length:
        logger.warning(f"sft.max_length={max_length} exceeds the model's trained length {model.arch.length}.")
    train, valid, spec, template = build_datasets(cfg, tokenizer, max_length, logger)

    if cfg.sft.freeze_embeddings:
        model.vocab_embed.embedding.requires_grad_(False)
    model.to(device).train()
    logger.info(
        f"Model: {utils.count_parameters(model) / 1e6:.1f}M parameters ({utils.count_parameters(model, True) / 1e6:.1f}M trainable)"
    )
    state, forward_model = recipe.build_train_state(model, cfg, precision, world > 1, run_dir, logger)

    per_rank = cfg.training.batch_size // world
    micro = recipe.check_batch_layout(cfg.training.batch_size, cfg.training.accum, world)
    sampler = data.LengthGroupedSampler(
        train["length"],
        batch_size=per_rank,
        seed=cfg.seed,
        shuffle=True,
        num_replicas=world,
        rank=rank,
        group_by_length=cfg.training.group_by_length,
    )
    stream = recipe.batch_stream(sampler, per_rank, state)
    pad_id = tokenizer.eos_token_id
    pad_to = max_length if cfg.sft.pad_with_eos else None
    sampling_eps = cfg.training.sampling_eps

    def loss_fn(fwd, mb):
        return batch_loss(fwd, mb, graph, noise, mb["draws"], sampling_eps)

    def step_fn(st: TrainState):
        indices = next(stream)
        micro_batches = [
            sft_batch(train, part, pad_id, pad_to, device, cfg.seed, st.step)
            for part in recipe.split_micro(indices, cfg.training.accum)
        ]
        assert all(len(mb["input_ids"]) == micro for mb in micro_batches)
        return train_step(
            st,
            forward_model,
            micro_batches,
            loss_fn,
            precision=precision,
            device=device,
            grad_clip=cfg.optim.grad_clip,
        )

    n_eval = min(len(valid), cfg.training.eval_examples)
    eval_indices = list(range(rank, n_eval, world))

    def eval_batches():
        for start in range(0, len(eval_indices), micro):
            part = eval_indices[start : start + micro]
            yield part, sft_batch(valid, part, pad_id, pad_to, device, cfg.seed + 1, 0)

    def eval_fn(st: TrainState) -> dict[str, float]:
        loss = evaluate_loss(
            st, eval_batches(), lambda m, b, _: loss_fn(m, b), precision=precision, device=device
        )
        if utils.is_main_process() and cfg.sampling.n_prompts > 0:
            write_samples(st, valid, tokenizer, graph, noise, cfg, run_dir, device, precision)
        utils.barrier()
        return {"loss": loss}

    def extra_files():
        return {SFT_CONFIG_FILE: sft_generation_config(cfg, spec, max_length)}

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
        outcome = recipe.run_loop(state, loop, run_dir, step_fn, eval_fn, metrics, logger, extra_files)
    finally:
        metrics.close()
    if outcome == "done":
        logger.info(
            f"Done: {state.step} steps. Fine-tuned model (EMA weights): {run_dir / recipe.EXPORT_DIR}"
        )
    return outcome


def sft_generation_config(cfg: DictConfig, spec, max_length: int) -> dict:
    """What generation needs to prompt the fine-tuned model the way it was trained (saved beside the weights)."""
    return {
        "prompt_template": cfg.sft.prompt_template,
        "thinking_template": cfg.sft.thinking_template,
        "max_length": max_length,
        "pad_with_eos": bool(cfg.sft.pad_with_eos),
        "field_mode": spec.mode,
        "dataset": str(cfg.sft.dataset),
    }


@torch.no_grad()
def write_samples(state, valid, tokenizer, graph, noise, cfg, run_dir: Path, device, precision) -> None:
    """Answers to the first validation prompts, from the EMA weights, to samples/step_<N>.jsonl.
    An EOS-padded model fills its whole training length; otherwise up to `sampling.max_new_tokens` follow."""
    max_length = cfg.sft.max_length or state.model.arch.length
    from generation import generate_from_token_prompts, write_jsonl

    rows = [valid[i] for i in range(min(cfg.sampling.n_prompts, len(valid)))]
    prompts = [row["input_ids"][: row["prompt_len"]] for row in rows]
    params = [p for p in state.model.parameters() if p.requires_grad]
    state.model.eval()
    with state.ema.average_parameters(params):
        completions = generate_from_token_prompts(
            state.model,
            graph,
            noise,
            tokenizer,
            prompts,
            max_new_tokens=max_length if cfg.sft.pad_with_eos else cfg.sampling.max_new_tokens,
            max_length=max_length,
            steps=cfg.sampling.steps,
            predictor=cfg.sampling.predictor,
            device=device,
            precision=precision,
            seed=cfg.seed,
        )
    state.model.train()
    records = [
        {
            "step": state.step,
            "prompt": tokenizer.decode(prompt),
            "reference": tokenizer.decode(row["input_ids"][row["prompt_len"] :], skip_special_tokens=True),
            "completion": completion,
        }
        for prompt, row, completion in zip(prompts, rows, completions, strict=True)
    ]
    write_jsonl(run_dir / "samples" / f"step_{state.step}.jsonl", records)


@hydra.main(version_base=None, config_path="configs", config_name="sft")
@recipe.user_errors_exit
def main(cfg: DictConfig) -> None:
    cfg = recipe.resume_config(cfg)
    validate_config(cfg)
    recipe.launch(cfg, run_sft)


if __name__ == "__main__":
    recipe.preflight_output_dir(sys.argv[1:])
    main()
