"""Reinforcement-learning fine-tuning of SEDD discrete-diffusion language models, starting from an SFT model.

    python run_rl.py rl.pretrained_model=exp_local/sft/gsm8k/2024.01.15/120000      # ReFT on GSM8K
    python run_rl.py rl/method=rwd rl.pretrained_model=<SFT run dir, hf_model dir or hub id>
    python run_rl.py experiment=rl_demo                    # offline CPU demo from exp_local/demo/sft (ReFT)
    python run_rl.py experiment=rl_demo rl/method=rwd      # reward-weighted denoising on the demo
    python run_rl.py load_dir=exp_local/rl/reft/2024.01.15/120000                  # resume
    python run_rl.py -m hydra.launcher.partition=gpu ngpus=8 rl.pretrained_model=...   # SLURM (submitit)

Methods (`rl/method`, instantiated from `_target_`): `reft` (rl/reft.py, rejection-sampling fine-tuning),
`rwd` (rl/rwd.py, reward-weighted denoising), `dpo` (rl/dpo.py, diffusion DPO) and `pg` (rl/pg.py, GRPO-style
policy gradient). Rewards (`reward`): configs/reward/*.yaml, or your own function.

One iteration: `rl.k` completions of each of `rl.prompts_per_iter` prompts from the policy (rl/rollout.py),
their rewards (rl/rewards.py) and KL estimate to the starting model (rl/kl.py), the method's selection and
weights, then `rl.epochs` passes of optimizer updates over the selected completions with the SFT loss,
weighted per completion (rl/buffer.py). The likelihood-ratio methods (dpo, pg: `method.needs_reference`)
bring their own examples, batches and loss instead: `prepare` scores an iteration's examples once under the
sampling policy and the reference (rl/estimators.py), `collate` and `loss` make each update.
`training.n_iters` counts optimizer updates; checkpoints, resume, DDP and preemption are sft.py's (recipe.py). Options: configs/rl.yaml (`python run_rl.py --cfg job`).
"""

from __future__ import annotations

import copy
import functools
import sys
from typing import Any

import hydra
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import data
import graph_lib
import noise_lib
import recipe
import utils
from generation import GENERATION_CONFIG_FILE, PromptFormat, prompt_format, write_jsonl
from load_model import load_pretrained
from model import SEDD
from rl.buffer import ExampleBuffer, Selection, gather, micro_batches, weighted_batch_loss
from rl.kl import elbo_kl
from rl.rewards import exact_match, score
from rl.rollout import PromptSet, Rollout, build_prompt_set, generate_rollouts, policy_weights, summary
from rl.rwd import OfflineGroups, load_offline
from tokenizer import get_tokenizer
from training import TrainState, resolve_precision, train_step

recipe.register_resolvers()
ROLLOUT_WEIGHTS = ("live", "ema")


NO_SIGNAL_HINTS = {
    "reft": "ReFT keeps completions at or over rl.method.threshold: lower it. ",
    "rwd": "Groups whose k rewards are all equal carry no weight: use a graded reward (e.g. reward=weighted) "
    "or rl.method.skip_uniform=False. ",
    "pg": "Groups whose k rewards are all equal have zero advantage: use a graded reward (e.g. reward=weighted) "
    "or rl.method.normalize=batch. ",
    "dpo": "A pair needs two completions of a prompt with different rewards: use a graded reward "
    "(e.g. reward=weighted). ",
}


class NoSignalError(ValueError):
    """rl.max_empty_iters iterations in a row gave the method nothing to train on (a fixable setting: the run
    ends with its message and exit code 1)."""


# ----------------------------------------------------------------------------- setup
def build(node: DictConfig, key: str) -> Any:
    """`instantiate(node)`, with the error of a bad option (the ValueError / ImportError the target raises,
    which Hydra wraps) re-raised as a ValueError naming the config key, so the run ends with its message."""
    try:
        return instantiate(node)
    except InstantiationException as err:
        cause = err.__cause__ if err.__cause__ is not None else err
        raise ValueError(f"{key} ({node.get('_target_')}): {cause}") from err


def validate_config(cfg: DictConfig) -> None:
    """Cross-field checks, each error saying how to fix it."""
    rl = cfg.rl
    if OmegaConf.is_missing(rl, "pretrained_model") or not rl.pretrained_model:
        raise ValueError(
            "rl.pretrained_model is required: the SFT model to improve, as a run directory (e.g. "
            "exp_local/demo/sft), a hub-format directory or a hub id."
        )
    for key in ("k", "prompts_per_iter", "max_empty_iters"):
        if rl[key] < 1:
            raise ValueError(f"rl.{key}={rl[key]} must be at least 1.")
    if rl.epochs <= 0:
        raise ValueError(
            f"rl.epochs={rl.epochs} must be > 0 (passes over each iteration's selected samples)."
        )
    if rl.rollout_weights not in ROLLOUT_WEIGHTS:
        raise ValueError(
            f"rl.rollout_weights={rl.rollout_weights!r} is not valid; choose one of {ROLLOUT_WEIGHTS}."
        )
    if rl.eval_prompts < 0:
        raise ValueError(f"rl.eval_prompts={rl.eval_prompts} must be >= 0 (0: no evaluation).")
    if cfg.ngpus < 1:
        raise ValueError(f"ngpus={cfg.ngpus} must be at least 1.")
    info = utils.detect_launch()
    world = info.world_size if info is not None else cfg.ngpus
    recipe.check_batch_layout(cfg.training.batch_size, cfg.training.accum, world)
    if rl.prompts_per_iter % world:
        raise ValueError(
            f"rl.prompts_per_iter={rl.prompts_per_iter} is not divisible by the {world} processes; choose a multiple."
        )
    method = build(cfg.rl.method, "rl.method")  # the method checks its own options
    if method.offline is None and rl.k < method.min_group_size:
        raise ValueError(
            f"rl/method={method.name} compares the k completions of each prompt; rl.k={rl.k} must be at least "
            f"{method.min_group_size} (or set rl.method.normalize=batch)."
            if getattr(method, "normalize", "group") == "group"
            else f"rl.k={rl.k} is too small for rl/method={method.name}."
        )


def check_vocabulary(model: SEDD, tokenizer) -> None:
    if model.arch.tokens != len(tokenizer):
        raise ValueError(
            f"The model has {model.arch.tokens} tokens but the GPT-2 tokenizer has {len(tokenizer)}; RL decodes "
            "completions for the reward, so it needs a model of the GPT-2 vocabulary (tokens: 50257)."
        )


def rollout_format(cfg: DictConfig, model: SEDD) -> PromptFormat:
    """How the starting model wants to be prompted (its sft_config.json), with the rl.* overrides."""
    base = prompt_format(cfg.rl.pretrained_model, model.arch.length)
    return PromptFormat(
        template=cfg.rl.prompt_template or base.template,
        max_length=int(cfg.rl.max_length or base.max_length),
        pad_with_eos=base.pad_with_eos if cfg.rl.pad_with_eos is None else bool(cfg.rl.pad_with_eos),
        thinking_template=base.thinking_template,
    )


def build_prompts(
    cfg: DictConfig, tokenizer, fmt: PromptFormat, logger
) -> tuple[PromptSet, PromptSet | None]:
    """Training prompts (rl.split) and held-out evaluation prompts (first rl.eval_prompts of rl.eval_split)."""
    rl = cfg.rl
    if not utils.is_main_process():
        utils.barrier()
    splits = data.load_raw_dataset(rl.dataset)
    if utils.is_main_process():
        utils.barrier()
    for split in (rl.split, rl.eval_split if rl.eval_prompts else None):
        if split is not None and split not in splits:
            raise ValueError(
                f"{rl.dataset} has splits {list(splits)}, not {split!r}; set rl.split / rl.eval_split."
            )
    train = build_prompt_set(splits[rl.split], rl.question_field, tokenizer, fmt.template, fmt.max_length)
    if rl.answer_field is not None and rl.answer_field not in train.fields:
        raise ValueError(
            f"rl.answer_field={rl.answer_field!r} is not a column of {rl.dataset} ({sorted(train.fields)}); set it "
            "to the reference-answer column, or null."
        )
    evaluation = None
    if rl.eval_split is not None and rl.eval_prompts > 0:
        rows = splits[rl.eval_split]
        rows = rows.select(range(min(rl.eval_prompts, len(rows))))
        evaluation = build_prompt_set(rows, rl.question_field, tokenizer, fmt.template, fmt.max_length)
    logger.info(
        f"Prompts: {len(train)} from {rl.dataset}[{rl.split}]"
        + (f", {len(evaluation)} held out from [{rl.eval_split}]" if evaluation is not None else "")
        + f" | format {fmt}"
    )
    return train, evaluation


def _rollout_seed(seed: int, iteration: int, rank: int) -> int:
    return (seed * 1_000_003 + iteration * 7_919 + rank * 104_729 + 0x51) % (2**31 - 1)


# ----------------------------------------------------------------------------- one iteration's data
@torch.no_grad()
def rollout_kl(
    policy,
    reference,
    graph,
    noise,
    rollout: Rollout,
    *,
    id_base: int,
    eos_id: int,
    pad_to,
    cfg,
    device,
    precision,
) -> tuple[list[float], list[int]]:
    """Per-completion `DWDSE_ref - DWDSE_pi` (nats) and scored tokens of a rollout's rows (rl/kl.py)."""
    diffs: list[float] = []
    counts: list[int] = []
    size = cfg.sampling.batch_size
    for start in range(0, len(rollout), size):
        rows = list(range(start, min(start + size, len(rollout))))
        diff, n = elbo_kl(
            policy,
            reference,
            graph,
            noise,
            rollout.batch(rows, eos_id, pad_to),
            ids=[id_base + r for r in rows],
            seed=cfg.seed + 17,
            sampling_eps=cfg.training.sampling_eps,
            precision=precision,
            device=device,
        )
        diffs.extend(diff.tolist())
        counts.extend(n.tolist())
    return diffs, counts


def sample_metrics(rows: dict[str, list[Any]]) -> dict[str, float]:
    """Reward mean/std/max, accuracy, completion length, finished share and KL of gathered per-row values."""
    metrics = summary(rows["reward"], "reward")
    metrics.pop("reward_min", None)
    if rows.get("correct"):
        metrics["accuracy"] = sum(rows["correct"]) / len(rows["correct"])
    if rows.get("completion_len"):
        metrics["completion_len"] = sum(rows["completion_len"]) / len(rows["completion_len"])
        metrics["finished"] = sum(rows["finished"]) / len(rows["finished"])
    if rows.get("kl"):
        metrics["kl"] = sum(rows["kl"]) / max(sum(rows["kl_tokens"]), 1)
    for name, values in rows.items():
        if name.startswith("reward/"):
            metrics[f"{name}_mean"] = sum(values) / len(values)
    return metrics


def mean_metrics(values: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over a list of micro-batches' metrics, averaged over processes."""
    keys = sorted({k for v in values for k in v})
    means = torch.tensor(
        [sum(v[k] for v in values if k in v) / sum(k in v for v in values) for k in keys], dtype=torch.float64
    )
    return dict(zip(keys, utils.all_reduce_mean(means).tolist(), strict=True))


# ----------------------------------------------------------------------------- run
def run_rl(cfg: DictConfig) -> str:
    run_dir = utils.check_writable_dir(cfg.work_dir)
    logger = utils.get_logger("rl", run_dir / "train.log")
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
    method = build(cfg.rl.method, "rl.method")
    logger.info(
        f"Run directory: {run_dir} | {world} process(es) on {device} | precision {precision} | {method}"
    )

    tokenizer = get_tokenizer()
    eos_id = tokenizer.eos_token_id
    model = load_pretrained(cfg.rl.pretrained_model)
    check_vocabulary(model, tokenizer)
    graph = graph_lib.get_graph(model.config, device)
    noise = noise_lib.get_noise(model.config).to(device)
    fmt = rollout_format(cfg, model)
    pad_to = fmt.max_length if fmt.pad_with_eos else None
    reference = None
    likelihood_method = getattr(method, "needs_reference", False)  # dpo, pg
    if cfg.rl.kl_estimate or getattr(method, "kl_coef", 0) > 0 or likelihood_method:
        reference = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    scorer = None
    if likelihood_method:
        scorer = method.scorer(
            graph,
            noise,
            reference,
            seed=cfg.seed,
            sampling_eps=cfg.training.sampling_eps,
            eos_id=eos_id,
            pad_to=pad_to,
            device=device,
            precision=precision,
            batch_size=cfg.sampling.batch_size,
        )
    model.to(device).train()
    reward_fn = build(cfg.reward, "reward")
    prompts, evaluation = build_prompts(cfg, tokenizer, fmt, logger)
    offline: OfflineGroups | None = None
    if method.offline is not None:
        if hasattr(method, "load_offline"):  # dpo: preference pairs
            offline = method.load_offline(tokenizer, fmt.template, fmt.max_length)
        else:
            offline = load_offline(method.offline, tokenizer, fmt.template, fmt.max_length)
        logger.info(
            f"Offline data: {sum(len(g) for g in offline.groups)} scored completions of {len(offline)} prompts"
        )
    heldout = (
        method.load_eval(tokenizer, fmt.template, fmt.max_length, scorer)
        if hasattr(method, "load_eval")
        else None
    )

    state, forward_model = recipe.build_train_state(model, cfg, precision, world > 1, run_dir, logger)
    buffer = ExampleBuffer.from_state_dict(state.extra.get("rl"))

    per_rank_prompts = cfg.rl.prompts_per_iter // world
    lengths = [len(g) for g in offline.groups] if offline is not None else [len(p) for p in prompts.ids]
    sampler = data.LengthGroupedSampler(
        lengths,
        batch_size=per_rank_prompts,
        seed=cfg.seed,
        shuffle=True,
        num_replicas=world,
        rank=rank,
        group_by_length=False,
    )
    stream = recipe.batch_stream(sampler, per_rank_prompts, state)
    metrics = recipe.MetricsLogger(
        run_dir,
        logger,
        cfg.logging.tensorboard,
        cfg.logging.wandb_project if cfg.logging.wandb else None,
        OmegaConf.to_container(cfg, resolve=True),
    )

    def score_rollout(policy, rollout: Rollout, id_base: int) -> dict[str, list[Any]]:
        """Per-row values of a rollout on this process: reward (and components), correctness, lengths, KL."""
        questions, fields = rollout.row_questions(), rollout.row_fields()
        scores = score(reward_fn, questions, rollout.texts, fields)
        rows: dict[str, list[Any]] = {
            "reward": scores.total,
            "completion_len": rollout.completion_len.tolist(),
            "finished": rollout.finished.tolist(),
            **{f"reward/{name}": values for name, values in scores.components.items()},
        }
        if cfg.rl.answer_field is not None:
            rows["correct"] = exact_match(
                questions, rollout.texts, reference_field=cfg.rl.answer_field, **fields
            )
        if reference is not None:
            rows["kl"], rows["kl_tokens"] = rollout_kl(
                policy,
                reference,
                graph,
                noise,
                rollout,
                id_base=id_base,
                eos_id=eos_id,
                pad_to=pad_to,
                cfg=cfg,
                device=device,
                precision=precision,
            )
        return rows

    def prepare(examples: list[dict], policy, id_base: int) -> list[dict]:
        """dpo/pg: the selected examples scored once under the policy that sampled them and the reference."""
        return examples if scorer is None else method.prepare(examples, policy, scorer, id_base)

    def collect(st: TrainState) -> None:
        """One iteration's data: sample (or read offline), score, select, and refill the buffer (all processes)."""
        indices = next(stream)
        id_base = (buffer.iteration + 1) * 10_000_000 + rank * 1_000_000
        if offline is not None:
            groups = [offline.groups[i] for i in indices]
            examples_all = [ex for g in groups for ex, _, _ in g]
            rows = {"reward": [r for g in groups for _, r, _ in g]}
            group_ids = [j for j, g in enumerate(groups) for _ in g]
            selection = method.select(rows["reward"], 1, groups=group_ids)
            examples = [
                dict(examples_all[r], weight=w)
                for r, w in zip(selection.rows, selection.weights, strict=True)
            ]
            with policy_weights(st, use_ema=False) as policy:
                examples = prepare(examples, policy, id_base)
            records = [
                {"prompt": offline.questions[i], "completion": text, "reward": r}
                for i, g in zip(indices, groups, strict=True)
                for _, r, text in g
            ]
        else:
            ids, questions, fields = prompts.take(indices)
            with policy_weights(st, cfg.rl.rollout_weights == "ema") as policy:
                rollout = generate_rollouts(
                    policy,
                    graph,
                    noise,
                    tokenizer,
                    ids,
                    questions,
                    fields,
                    k=cfg.rl.k,
                    max_length=fmt.max_length,
                    pad_with_eos=fmt.pad_with_eos,
                    max_new_tokens=cfg.rl.max_new_tokens,
                    steps=cfg.sampling.steps,
                    predictor=cfg.sampling.predictor,
                    device=device,
                    precision=precision,
                    seed=_rollout_seed(cfg.seed, buffer.iteration, rank),
                    batch_size=cfg.sampling.batch_size,
                    show_progress=utils.is_main_process() and sys.stderr.isatty(),  # no bars in logs
                )
                rows = score_rollout(policy, rollout, id_base)
                keys = [tuple(t) for t in rollout.tokens]
                selection = method.select(rows["reward"], cfg.rl.k, keys=keys, kl=rows.get("kl"))
                examples = prepare(
                    rollout.examples(selection.rows, selection.weights, eos_id), policy, id_base
                )
            records = [
                {"prompt": rollout.questions[b], "completion": text, "reward": r}
                for b, text, r in zip(rollout.group.tolist(), rollout.texts, rows["reward"], strict=True)
            ]
        weights: dict[int, float] = {}  # a row selected several times (rwd's resampling): its summed weight
        for row, weight in zip(selection.rows, selection.weights, strict=True):
            weights[row] = weights.get(row, 0.0) + weight
        for i, record in enumerate(records):
            record.update(selected=i in weights, weight=weights.get(i, 0.0))
            for name in ("correct", "kl"):
                if name in rows:
                    record[name] = rows[name][i]
        report(st, gather(examples), {k: gather(v) for k, v in rows.items()}, selection, gather(records))

    def report(
        st: TrainState, examples: list[dict], rows: dict[str, list], selection: Selection, records: list[dict]
    ) -> None:
        buffer.refill(examples, cfg.training.batch_size, cfg.rl.epochs)
        values = sample_metrics(rows)
        values["acceptance"] = len(examples) / max(len(rows["reward"]), 1)
        method_metrics = {k: float(v) for k, v in selection.metrics.items() if k != "acceptance"}
        values.update(
            {
                k: float(utils.all_reduce_mean(torch.tensor(v, dtype=torch.float64)))
                for k, v in method_metrics.items()
            }
        )
        values.update(iteration=buffer.iteration, examples=len(examples), updates=buffer.steps_left)
        metrics.log(st.step, values, "rollout")
        if cfg.logging.samples and utils.is_main_process():
            for record in records:
                record.update(iteration=buffer.iteration, step=st.step)
            write_jsonl(run_dir / "samples" / f"iter_{buffer.iteration}.jsonl", records)

    loss_metrics: list[dict[str, float]] = []  # dpo/pg: the metrics of each micro-batch since the last log

    def loss_fn(fwd, mb: dict[str, torch.Tensor]):
        if scorer is None:
            return weighted_batch_loss(fwd, mb, graph, noise, cfg.training.sampling_eps)
        terms, values = method.loss(fwd, mb, scorer)
        loss_metrics.append(values)
        return terms

    def step_fn(st: TrainState):
        while buffer.steps_left == 0:
            collect(st)
            st.extra["rl"] = buffer.state_dict()
            if buffer.empty_in_row >= cfg.rl.max_empty_iters:
                raise NoSignalError(
                    f"{buffer.empty_in_row} iterations in a row selected no completion for rl/method={method.name} "
                    f"(last rollout's metrics are in {run_dir / 'train.log'}). {NO_SIGNAL_HINTS.get(method.name, '')}"
                    "Raise rl.k, check the reward on the samples/ files, or start from a better SFT model."
                )
        positions = buffer.next_positions(cfg.training.batch_size)
        batches = micro_batches(
            buffer,
            positions,
            accum=cfg.training.accum,
            eos_id=eos_id,
            pad_to=pad_to,
            seed=cfg.seed,
            step=st.step,
            device=device,
            collate_fn=None if scorer is None else functools.partial(method.collate, scorer=scorer),
        )
        result = train_step(
            st,
            forward_model,
            batches,
            loss_fn,
            precision=precision,
            device=device,
            grad_clip=cfg.optim.grad_clip,
        )
        st.extra["rl"] = buffer.state_dict()
        if loss_metrics and (st.step % cfg.training.log_freq == 0 or st.step >= cfg.training.n_iters):
            metrics.log(st.step, mean_metrics(loss_metrics), "train")
            loss_metrics.clear()
        return result

    def eval_fn(st: TrainState) -> dict[str, float]:
        """Held-out prompts, one sample each from the EMA weights (what is exported), fixed seed; held-out
        preference pairs (dpo with rl.method.offline.eval_split)."""
        values = {}
        if heldout is not None:
            with policy_weights(st, use_ema=True) as policy:
                values = method.evaluate(policy, heldout, scorer)
        if evaluation is None:
            return values
        mine = list(range(rank, len(evaluation), world))
        ids, questions, fields = evaluation.take(mine)
        with policy_weights(st, use_ema=True) as policy:
            rollout = generate_rollouts(
                policy,
                graph,
                noise,
                tokenizer,
                ids,
                questions,
                fields,
                k=1,
                max_length=fmt.max_length,
                pad_with_eos=fmt.pad_with_eos,
                max_new_tokens=cfg.rl.max_new_tokens,
                steps=cfg.sampling.steps,
                predictor=cfg.sampling.predictor,
                device=device,
                precision=precision,
                seed=cfg.seed + 1 + rank,
                batch_size=cfg.sampling.batch_size,
            )
            rows = score_rollout(policy, rollout, id_base=rank * 1_000_000)
        records = [
            {"step": st.step, "prompt": q, "completion": t, "reward": r}
            for q, t, r in zip(rollout.questions, rollout.texts, rows["reward"], strict=True)
        ]
        gathered = {k: gather(v) for k, v in rows.items()}
        records = gather(records)
        if cfg.logging.samples and utils.is_main_process():
            write_jsonl(run_dir / "samples" / f"eval_step_{st.step}.jsonl", records)
        return {**values, **sample_metrics(gathered)}

    def extra_files() -> dict[str, dict]:
        return {
            GENERATION_CONFIG_FILE: {
                "prompt_template": fmt.template,
                "thinking_template": fmt.thinking_template,
                "max_length": fmt.max_length,
                "pad_with_eos": fmt.pad_with_eos,
                "field_mode": "qa",
                "dataset": str(cfg.rl.dataset),
                "rl_method": method.name,
                "start_model": str(cfg.rl.pretrained_model),
            }
        }

    loop = recipe.LoopConfig(
        n_iters=cfg.training.n_iters,
        log_freq=cfg.training.log_freq,
        eval_freq=cfg.training.eval_freq,
        snapshot_freq=cfg.training.snapshot_freq,
        snapshot_freq_for_preemption=cfg.training.snapshot_freq_for_preemption,
        keep_last=cfg.training.keep_last,
        max_nonfinite=cfg.training.max_nonfinite,
    )
    has_eval = evaluation is not None or heldout is not None
    if state.step == 0 and has_eval:
        metrics.log(0, eval_fn(state), "eval")
    try:
        outcome = recipe.run_loop(
            state, loop, run_dir, step_fn, eval_fn if has_eval else None, metrics, logger, extra_files
        )
    finally:
        metrics.close()
    if outcome == "done":
        logger.info(
            f"Done: {state.step} updates. Fine-tuned model (EMA weights): {run_dir / recipe.EXPORT_DIR}"
        )
    return outcome


@hydra.main(version_base=None, config_path="configs", config_name="rl")
@recipe.user_errors_exit
def main(cfg: DictConfig) -> None:
    cfg = recipe.resume_config(cfg)
    validate_config(cfg)
    recipe.launch(cfg, run_rl)


if __name__ == "__main__":
    recipe.preflight_output_dir(sys.argv[1:])
    main()
