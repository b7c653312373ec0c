"""Reward-guided sampling without retraining: value-weighted resampling of candidate states (SVDD, Li et al.,
2024, "Derivative-free guidance in continuous and discrete diffusion models with soft value-based decoding")
and best-of-N as the simple baseline.

SVDD (`method="svdd"`). At a guided step, from the current state x_t of each sequence draw N candidate next
states x_{t-dt}^(1..N) with the model's own reverse step (one forward pass on x_t serves all N), predict the
clean sequence of each candidate with a one-step denoise (argmax of the model's denoiser at t - dt, the prompt
kept), decode it and score it with the reward: v_n = r(x0_hat(x^(n))). Keep candidate n with probability
softmax(v / alpha)_n (alpha = 0: the best, first on ties). The final denoiser step is guided the same way on
fully denoised candidates. Cost per guided step: 1 + N forward passes instead of 1, plus N reward calls.
`every=m` guides every m-th predictor step only.

Best-of-N (`method="best_of_n"`): N independent samples per sequence, keep the best (softmax(v / alpha) when
alpha > 0). Cost: N samples.

Library:

    guidance = Guidance(method="svdd", num_candidates=4, alpha=0.0)
    completions = guided_complete(model, graph, noise, tokenizer, prompt_ids, questions, exact_match,
                                  {"answer": answers}, guidance=guidance, max_new_tokens=48, max_length=48,
                                  steps=48)                          # like generation.complete

Command line (run_sample.py / evaluate.py): `add_guidance_args(parser)`, then `guidance_from_args(args)` gives
`(Guidance, reward_fn)` or None, and `guided_prompted_samples(...)` replaces `generation.prompted_samples`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

import sampling
from generation import Completion, PromptFormat, cut_at_eos, encode_prompts, prompted_samples
from rl.rewards import RewardFn, build_reward, score
from training import PRECISIONS

# value_fn(x0_hat [M, L] long, rows [M] long) -> values [M]: rows[m] is the sequence (0..B-1) of candidate m
ValueFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
METHODS = ("svdd", "best_of_n")


@dataclass(frozen=True)
class Guidance:
    """How to steer sampling with a reward: `method` (svdd | best_of_n), `num_candidates` N per sequence,
    the resampling temperature `alpha` (0: keep the best) and, for svdd, `every` (guide every m-th step)."""

    method: str = "svdd"
    num_candidates: int = 4
    alpha: float = 0.0
    every: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"guidance method={self.method!r} is not valid; choose one of {METHODS}.")
        if self.num_candidates < 1 or self.every < 1:
            raise ValueError(
                f"guidance num_candidates={self.num_candidates} and every={self.every} must be at least 1."
            )
        if self.alpha < 0:
            raise ValueError(f"guidance alpha={self.alpha} must be >= 0 (0: keep the best candidate).")


# ----------------------------------------------------------------------------- token-level samplers
class _SharedScorer:
    """Scores of a batch that repeats each of B sequences N times (rows b * N + n), computed once on the B
    distinct sequences: the N candidates of a sequence come from the same state, hence the same scores."""

    def __init__(self, scorer: sampling.LogScorer, n: int):
        self.scorer, self.n = scorer, n

    def scores(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.reshape(-1).expand(x.shape[0])
        return self.scorer.scores(x[:: self.n], sigma[:: self.n]).repeat_interleave(self.n, dim=0)

    def rows(self, x: torch.Tensor, sigma: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        sigma = sigma.reshape(-1).expand(x.shape[0])
        base = rows[:: self.n]
        out = self.scorer.rows(x[:: self.n], sigma[:: self.n], base)  # [M, dim], row-major over base
        counts = base.sum(dim=1).tolist()
        starts = torch.tensor([0, *counts[:-1]], device=out.device).cumsum(0).tolist()
        index = torch.cat(
            [
                torch.arange(s, s + c, device=out.device).repeat(self.n)
                for s, c in zip(starts, counts, strict=True)
            ]
        )
        return out[index]


def _limit(
    graph, shape: tuple[int, int], device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """The t = 1 state: all mask tokens (absorbing graph) or uniform tokens."""
    if graph.absorb:
        return torch.full(shape, graph.dim - 1, dtype=torch.long, device=device)
    return torch.randint(0, graph.dim, shape, device=device, generator=generator)


@torch.no_grad()
def denoise_argmax(
    scorer: sampling.LogScorer, graph, noise, x: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """One-step prediction of the clean sequence from x [B, L] at t [B, 1]: the argmax of the final
    denoiser's distribution (the Tweedie step at t) at every position it may change; [B, L]."""
    sigma = noise(t)[0]
    if graph.absorb:
        masked = x == graph.dim - 1
        if not masked.any():
            return x
        log_score = scorer.rows(x, sigma, masked)
        out = x.clone()
        out[masked] = log_score[:, :-1].argmax(dim=-1)
        return out
    score = scorer.scores(x, sigma)
    probs = graph.staggered_score(score, sigma) * graph.transp_transition(x, sigma)
    return probs.argmax(dim=-1)


def _choose(values: torch.Tensor, alpha: float, generator: torch.Generator | None) -> torch.Tensor:
    """Index [B] of the kept candidate per row of values [B, N]: argmax, or a draw from softmax(v / alpha)."""
    if alpha == 0:
        return values.argmax(dim=1)
    probs = torch.softmax(values.double() / alpha, dim=1).float()
    gen_device = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(gen_device), 1, generator=generator).squeeze(1).to(values.device)


def _check_layout(
    fixed_tokens: torch.Tensor, fixed_mask: torch.Tensor | None, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """The positions that never change (fixed or padding), [B, L] bool."""
    if fixed_tokens.dim() != 2:
        raise ValueError(f"fixed_tokens must be [B, L]; got shape {tuple(fixed_tokens.shape)}.")
    keep = torch.zeros_like(fixed_tokens, dtype=torch.bool)
    for name, mask in (("fixed_mask", fixed_mask), ("attention_mask", attention_mask)):
        if mask is not None and mask.shape != fixed_tokens.shape:
            raise ValueError(f"{name} has shape {tuple(mask.shape)}; expected {tuple(fixed_tokens.shape)}.")
    if fixed_mask is not None:
        keep |= fixed_mask.bool()
    if attention_mask is not None:
        keep |= attention_mask == 0
    return keep


@torch.no_grad()
def guided_sample(
    model,
    graph,
    noise,
    value_fn: ValueFn,
    *,
    fixed_tokens: torch.Tensor,
    fixed_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    steps: int,
    guidance: Guidance = Guidance(),
    predictor: str = "analytic",
    eps: float = 1e-5,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    show_progress: bool = False,
) -> torch.Tensor:
    """Reward-guided samples [B, L] (long) of a SEDD model; the layout arguments are `sampling.sample`'s.

    `value_fn(x0_hat [M, L], rows [M]) -> [M]` scores candidate clean sequences (`rows[m]` is the index in
    0..B-1 of the sequence candidate m belongs to). See the module docstring for the two methods; with
    `num_candidates=1` both are the plain sampler.
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1.")
    device = fixed_tokens.device
    keep = _check_layout(fixed_tokens, fixed_mask, attention_mask)
    n_cand = guidance.num_candidates
    batch, length = fixed_tokens.shape
    rows = torch.arange(batch, device=device).repeat_interleave(n_cand)

    def rep(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.repeat_interleave(n_cand, dim=0)

    if guidance.method == "best_of_n":
        x = sampling.sample(
            model,
            graph,
            noise,
            fixed_tokens=rep(fixed_tokens),
            fixed_mask=rep(keep),
            attention_mask=rep(attention_mask),
            steps=steps,
            predictor=predictor,
            eps=eps,
            generator=generator,
            autocast_dtype=autocast_dtype,
            show_progress=show_progress,
        )
        values = value_fn(x, rows).to(device).view(batch, n_cand)
        return x.view(batch, n_cand, length)[
            torch.arange(batch, device=device), _choose(values, guidance.alpha, generator)
        ]

    keep_r, fixed_r = rep(keep), rep(fixed_tokens)
    scorer = sampling.LogScorer(model, attention_mask=attention_mask, autocast_dtype=autocast_dtype)
    scorer_r = sampling.LogScorer(model, attention_mask=rep(attention_mask), autocast_dtype=autocast_dtype)
    shared = _SharedScorer(scorer, n_cand)
    predictor_step = sampling.get_predictor(predictor)(graph, noise)
    denoiser = sampling.Denoiser(graph, noise)
    fast = graph.absorb
    timesteps = torch.linspace(1, eps, steps + 1, device=device)
    dt = (1 - eps) / steps

    def proj(x: torch.Tensor) -> torch.Tensor:
        return torch.where(keep, fixed_tokens, x)

    def proj_r(x: torch.Tensor) -> torch.Tensor:
        return torch.where(keep_r, fixed_r, x)

    def update(x: torch.Tensor, t: torch.Tensor, score) -> torch.Tensor:
        if fast:
            return predictor_step.absorbing_update_fn(score.rows, x, t, dt, generator)
        return predictor_step.update_fn(score.scores, x, t, dt, generator)

    def select(candidates: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor:
        values = value_fn(x0_hat, rows).to(device).view(batch, n_cand)
        choice = _choose(values, guidance.alpha, generator)
        return candidates.view(batch, n_cand, length)[torch.arange(batch, device=device), choice]

    x = proj(_limit(graph, (batch, length), device, generator))
    for i in tqdm(range(steps), desc="guided sampling", disable=not show_progress, leave=False):
        t = timesteps[i] * torch.ones(batch, 1, device=device)
        if (i + 1) % guidance.every or n_cand == 1:
            x = proj(update(x, t, scorer))
            continue
        candidates = proj_r(update(rep(x), rep(t), shared))
        t_next = timesteps[i + 1] * torch.ones(batch * n_cand, 1, device=device)
        x = select(candidates, proj_r(denoise_argmax(scorer_r, graph, noise, candidates, t_next)))

    t = timesteps[-1] * torch.ones(batch, 1, device=device)
    done = graph.absorb and not bool((x == graph.dim - 1).any())
    if n_cand == 1 or done:
        final = (
            denoiser.absorbing_update_fn(scorer.rows, x, t, generator)
            if fast
            else denoiser.update_fn(scorer.scores, x, t, generator)
        )
        return proj(final)
    xr, tr = rep(x), rep(t)
    if fast:
        candidates = denoiser.absorbing_update_fn(shared.rows, xr, tr, generator)
    else:
        candidates = denoiser.update_fn(shared.scores, xr, tr, generator)
    candidates = proj_r(candidates)
    return select(candidates, candidates)


# ----------------------------------------------------------------------------- text rewards
def text_value_fn(
    tokenizer,
    reward_fn: RewardFn,
    questions: Sequence[str],
    prompt_lens: Sequence[int],
    lengths: Sequence[int],
    fields: Mapping[str, Sequence[Any]] | None = None,
) -> ValueFn:
    """A `ValueFn` from a text reward: candidate b's answer is its tokens from `prompt_lens[b]` to
    `lengths[b]`, cut at the first EOS and decoded; the reward sees question b and the fields of row b."""
    eos = tokenizer.eos_token_id
    fields = {k: list(v) for k, v in (fields or {}).items()}

    def value(x0_hat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        idx = rows.tolist()
        texts = []
        for b, seq in zip(idx, x0_hat.tolist(), strict=True):
            answer, _ = cut_at_eos(seq[prompt_lens[b] : lengths[b]], eos)
            texts.append(tokenizer.decode(answer))
        scores = score(
            reward_fn, [questions[b] for b in idx], texts, {k: [v[b] for b in idx] for k, v in fields.items()}
        )
        return torch.tensor(scores.total, dtype=torch.float32)

    return value


@torch.no_grad()
def guided_complete(
    model,
    graph,
    noise,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    questions: Sequence[str],
    reward_fn: RewardFn,
    fields: Mapping[str, Sequence[Any]] | None = None,
    *,
    guidance: Guidance,
    max_new_tokens: int,
    max_length: int,
    steps: int,
    predictor: str = "analytic",
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    seed: int = 0,
    batch_size: int = 16,
    num_samples: int = 1,
    show_progress: bool = False,
) -> list[Completion]:
    """`generation.complete` with reward guidance: `len(prompts) * num_samples` completions, prompt-major.

    `questions[i]` and `fields[column][i]` are what the reward sees for prompt i (its question text, and e.g.
    the reference answer). `batch_size` counts sequences; the model sees `batch_size * num_candidates` rows.
    """
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    eos = tokenizer.eos_token_id
    jobs = [i for i in range(len(prompts)) for _ in range(num_samples)]
    too_long = [i for i in set(jobs) if len(prompts[i]) >= max_length]
    if too_long:
        raise ValueError(
            f"{len(too_long)} prompt(s) have max_length={max_length} tokens or more; shorten them or raise the length."
        )
    fields = {k: list(v) for k, v in (fields or {}).items()}
    results: list[Completion] = []
    batches = range(0, len(jobs), batch_size)
    for start in tqdm(batches, desc="guided generate", disable=not show_progress or len(batches) == 1):
        batch = jobs[start : start + batch_size]
        ids = [list(prompts[i]) for i in batch]
        lengths = [min(max_length, len(p) + max_new_tokens) for p in ids]
        length = max(lengths)
        tokens, fixed = sampling.prompt_batch(ids, length, mask_id=graph.dim - 1, pad_id=eos, lengths=lengths)
        attention_mask = (torch.arange(length)[None] < torch.tensor(lengths)[:, None]).long()
        value_fn = text_value_fn(
            tokenizer,
            reward_fn,
            [questions[i] for i in batch],
            [len(p) for p in ids],
            lengths,
            {k: [v[i] for i in batch] for k, v in fields.items()},
        )
        out = guided_sample(
            model,
            graph,
            noise,
            value_fn,
            fixed_tokens=tokens.to(device),
            fixed_mask=fixed.to(device),
            attention_mask=attention_mask.to(device) if min(lengths) < length else None,
            steps=steps,
            guidance=guidance,
            predictor=predictor,
            generator=generator,
            autocast_dtype=PRECISIONS[precision],
            show_progress=show_progress and len(batches) == 1,
        )
        for prompt, row, row_length in zip(ids, out.tolist(), lengths, strict=True):
            answer, finished = cut_at_eos(row[len(prompt) : row_length], eos)
            results.append(Completion(answer, tokenizer.decode(answer), finished))
    return results


def guided_prompted_samples(
    model,
    graph,
    noise,
    tokenizer,
    prompts: Sequence[str],
    fmt: PromptFormat,
    *,
    reward_fn: RewardFn,
    guidance: Guidance,
    fields: Mapping[str, Sequence[Any]] | None = None,
    steps: int,
    max_new_tokens: int = 256,
    num_samples: int = 1,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """`generation.prompted_samples` with reward guidance (same records, plus the guiding `reward` of each
    answer). `fields[column][i]` goes with `prompts[i]` (e.g. `{"answer": reference_texts}`)."""
    completions = guided_complete(
        model,
        graph,
        noise,
        tokenizer,
        encode_prompts(tokenizer, prompts, fmt.template),
        list(prompts),
        reward_fn,
        fields,
        guidance=guidance,
        **fmt.canvas(max_new_tokens),
        steps=steps,
        num_samples=num_samples,
        **kwargs,
    )
    owner = [i // num_samples for i in range(len(completions))]
    rewards = score(
        reward_fn,
        [prompts[i] for i in owner],
        [c.text for c in completions],
        {k: [list(v)[i] for i in owner] for k, v in (fields or {}).items()},
    ).total
    return [
        {
            "prompt": prompts[owner[i]],
            "sample": i % num_samples,
            "completion": c.text,
            "finished": c.finished,
            "tokens": c.tokens,
            "reward": rewards[i],
        }
        for i, c in enumerate(completions)
    ]


def prompted_answers(
    model,
    graph,
    noise,
    tokenizer,
    prompts: Sequence[str],
    fmt: PromptFormat,
    guided: tuple[Guidance, RewardFn] | None,
    fields: Mapping[str, Sequence[Any]] | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """`generation.prompted_samples`, or `guided_prompted_samples` when `guided` = (guidance, reward) is given
    (`guidance_from_args`); `fields` (e.g. the reference answers) only reach the guiding reward."""
    if guided is None:
        return prompted_samples(model, graph, noise, tokenizer, prompts, fmt, **kwargs)
    guidance, reward_fn = guided
    return guided_prompted_samples(
        model,
        graph,
        noise,
        tokenizer,
        prompts,
        fmt,
        reward_fn=reward_fn,
        guidance=guidance,
        fields=fields,
        **kwargs,
    )


# ----------------------------------------------------------------------------- command line
def add_guidance_args(parser: argparse.ArgumentParser) -> None:
    """The reward-guidance flags of run_sample.py and evaluate.py."""
    group = parser.add_argument_group("reward guidance (rl/guidance.py)")
    add = group.add_argument
    add(
        "--guidance",
        choices=["none", *METHODS],
        default="none",
        help="reward-guided sampling (no retraining): svdd resamples N candidate states at each step by the "
        "reward of their denoised prediction; best_of_n keeps the best of N samples",
    )
    add(
        "--reward",
        default="exact_match",
        help="the guiding reward: exact_match, math_verify, format, length, reward_model, or an import path "
        "pkg.module.fn. The reference answer reaches it as the `answer` field: evaluate.py's answer column, "
        "run_sample.py's `answer` field of --prompts_file JSONL rows",
    )
    add(
        "--reward_kwargs",
        default="{}",
        help='JSON keyword arguments of the reward, e.g. \'{"pattern": "####"}\' or \'{"path": "my_rm_dir"}\'',
    )
    add(
        "--guidance_candidates", type=int, default=4, help="N: candidate states (svdd) or samples (best_of_n)"
    )
    add(
        "--guidance_alpha",
        type=float,
        default=0.0,
        help="keep candidates by softmax(reward / alpha); 0: the best",
    )
    add("--guidance_every", type=int, default=1, help="svdd: guide every m-th sampler step")


def check_guidance_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flag checks before anything is loaded (`parser.error` says how to fix the command)."""
    for name in ("guidance_candidates", "guidance_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} must be at least 1.")
    if args.guidance_alpha < 0:
        parser.error(f"--guidance_alpha={args.guidance_alpha} must be >= 0 (0: keep the best candidate).")
    try:
        json.loads(args.reward_kwargs)
    except json.JSONDecodeError as err:
        parser.error(f"--reward_kwargs is not valid JSON ({err}): {args.reward_kwargs!r}")


def guidance_from_args(args: argparse.Namespace) -> tuple[Guidance, RewardFn] | None:
    """`(Guidance, reward_fn)` from the flags of `add_guidance_args`, or None for `--guidance none`."""
    if args.guidance == "none":
        return None
    try:
        kwargs = json.loads(args.reward_kwargs)
    except json.JSONDecodeError as err:
        raise ValueError(f"--reward_kwargs is not valid JSON ({err}): {args.reward_kwargs!r}") from err
    if not isinstance(kwargs, dict):
        raise ValueError('--reward_kwargs must be a JSON object, e.g. \'{"pattern": "####"}\'.')
    guidance = Guidance(args.guidance, args.guidance_candidates, args.guidance_alpha, args.guidance_every)
    return guidance, build_reward(args.reward, **kwargs)
