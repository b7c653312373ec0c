"""Sampling from a SEDD model: the predictor-corrector sampler of the original repository (Lou, Meng & Ermon,
ICML 2024, Section 4.1 and Algorithms 1-2), with conditioning, padding and a fast path for the absorbing graph.

The reverse process starts from the t = 1 limit (all mask tokens for the absorbing graph, uniform tokens for the
uniform graph) and takes `steps` predictor steps on t = linspace(1, eps, steps + 1), then a final denoiser step
at t = eps (Tweedie denoising, the paper's "noise removal"). The model maps tokens `x` [B, L] and the total
noise `sigma` [B] to log-scores [B, L, dim]; we use the scores s = exp(log-score) as in the original.

Predictors (`get_predictor`): `euler` (Euler tau-leaping with the reverse rate Q^T s), `analytic` (Tweedie
tau-leaping: exp(-dsigma Q) s times the backward transition, paper Eq. 18), `none` (denoiser only).

Conditioning (`sample`): positions with `fixed_mask` hold `fixed_tokens` from the start and are reset after
every step, so the model always sees them clean (prompts, suffixes, infilling; `run_sample_cond` in the
original). Padding positions (`attention_mask == 0`) are treated as fixed: they keep the pad id given in
`fixed_tokens` and are hidden from the model's attention.

Fast absorbing path: with the absorbing graph an unmasked token has reverse rate zero, so it never changes;
only masked positions need work. `Predictor.absorbing_update_fn` gathers the N masked positions and computes
their transition probabilities as [N, dim] rows, with no [B, L, dim] one-hot tensors, then draws which rows
leave the mask and samples tokens on those rows only, in the same distribution as the reference update
(`Predictor.update_fn`; see `absorbing_analytic_probs` for the algebra and `_resample_masked` for the draw). If the model's
`forward` accepts `output_mask` (our `model.SEDD` does) its output layer is evaluated at those rows only.

Random numbers: pass a `torch.Generator` (on the sampling device) for reproducible draws; otherwise the global
torch RNG is used.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import graph_lib
from graph_lib import Graph
from noise_lib import Noise

# score_fn(x [B, L], sigma [B, 1] or [B]) -> scores exp(log-score) [B, L, dim], float32
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# log_score_rows(x [B, L], sigma [B, 1] or [B], rows [B, L] bool) -> log-scores of the selected rows [N, dim]
RowLogScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Projection = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------ model wrapper
def _accepts_output_mask(model: Callable[..., torch.Tensor]) -> bool:
    """Whether `model(x, sigma, attention_mask=..., output_mask=...)` is supported (by name in its signature)."""
    forward = model.forward if isinstance(model, nn.Module) else model
    try:
        return "output_mask" in inspect.signature(forward).parameters
    except (TypeError, ValueError):  # builtins or C callables without a signature
        return False


def _per_row(v: torch.Tensor, batch: int) -> torch.Tensor:
    """A per-example quantity ([B, 1], [B] or a single value) as a [B] vector."""
    return v.reshape(-1).expand(batch)


class LogScorer:
    """Calls the score network for sampling: float32 log-scores, optional autocast and attention mask.

    `model(x, sigma, attention_mask=None)` -> log-scores [B, L, dim]; `sigma` is passed as [B].
    Call under `torch.no_grad()` (the samplers do).
    """

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        autocast_dtype: torch.dtype | None = None,
    ):
        self.model = model
        self.attention_mask = attention_mask
        self.autocast_dtype = autocast_dtype
        self.row_output = _accepts_output_mask(model)

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None or self.autocast_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Log-scores [B, L, dim] (float32) of x [B, L] at total noise sigma [B, 1] or [B]."""
        with self._autocast(x.device):
            out = self.model(x, _per_row(sigma, x.shape[0]), attention_mask=self.attention_mask)
        return out.float()

    def scores(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Scores exp(log-score) [B, L, dim]: the original `get_score_fn(model, sampling=True)`."""
        return self(x, sigma).exp()

    def rows(self, x: torch.Tensor, sigma: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Log-scores [N, dim] of the N positions where `rows` [B, L] is True, in row-major order."""
        if not self.row_output:
            return self(x, sigma)[rows]
        with self._autocast(x.device):
            out = self.model(
                x, _per_row(sigma, x.shape[0]), attention_mask=self.attention_mask, output_mask=rows
            )
        return out.float()


# ------------------------------------------------------------------------ absorbing transition rows (math)
def absorbing_analytic_probs(log_score: torch.Tensor, dsigma: torch.Tensor) -> torch.Tensor:
    """Unnormalised analytic-step probabilities at masked positions of the absorbing graph.

    log_score [N, dim] (last column = mask), dsigma [N] (> 0) -> [N, dim].

    The reference `staggered_score(s, dsigma) * transp_transition(mask, dsigma)` at x = mask is, with
    S = sum_{y != mask} s_y:
        y != mask:  s_y e^{dsigma} (1 - e^{-dsigma}) = s_y (e^{dsigma} - 1)
        y = mask:   (s_mask + (1 - e^{dsigma}) S) * 1 = s_mask - (e^{dsigma} - 1) S
    (rows sum to s_mask, i.e. 1 for the model, whose log-score at the input token is 0). A negative stay
    entry is never drawn by `sample_categorical`, as in the reference.
    """
    probs = torch.empty_like(log_score)  # the only [N, dim] buffer
    jump = torch.add(log_score[:, :-1], torch.expm1(dsigma).clamp(min=0).log()[:, None], out=probs[:, :-1])
    torch.sub(log_score[:, -1].exp(), jump.exp_().sum(dim=-1), out=probs[:, -1])
    return probs


def absorbing_euler_probs(log_score: torch.Tensor, rate_dt: torch.Tensor) -> torch.Tensor:
    """Unnormalised Euler-step probabilities at masked positions of the absorbing graph.

    log_score [N, dim], rate_dt [N] = step_size * sigma(t) -> [N, dim].

    The reference `onehot(mask) + rate_dt * reverse_rate(mask, s)` is: y != mask: rate_dt s_y;
    y = mask: 1 - rate_dt S (the reverse rate's diagonal); the model's mask entry s_mask is not used.
    """
    probs = torch.empty_like(log_score)  # the only [N, dim] buffer
    jump = torch.exp(log_score[:, :-1], out=probs[:, :-1]).mul_(rate_dt[:, None])
    torch.sub(1, jump.sum(dim=-1), out=probs[:, -1])
    return probs


def absorbing_denoiser_probs(log_score: torch.Tensor) -> torch.Tensor:
    """Unnormalised denoiser probabilities over the real tokens at masked positions, [N, dim] -> [N, dim - 1].

    The reference gives s_y (e^{sigma} - 1) for y != mask and drops the mask column; the positive factor is
    the same for the whole row, so it does not change the distribution and is left out.
    """
    return log_score[:, :-1].exp()


def _resample_masked(
    x: torch.Tensor,
    masked: torch.Tensor,
    probs: torch.Tensor,
    generator: torch.Generator | None,
    stay_column: bool = False,
) -> torch.Tensor:
    """x [B, L] with its `masked` [B, L] positions replaced by draws from `probs` [N, K] (row-major order).

    Entries <= 0 are never drawn. With `stay_column` (the predictors: the last column is the mask state and the
    others are >= 0) the draw has two stages with the law of one categorical draw: whether each row leaves the
    mask, with probability J / (J + stay) where J is its mass on real tokens, then which token, by Gumbel-max
    over the leaving rows only. Most positions stay masked at a step, so few rows need vocabulary-sized noise.
    """
    x = x.clone()
    rows = masked.nonzero(as_tuple=True)
    if stay_column:
        jump_mass = probs[:, :-1].sum(dim=-1)
        total = jump_mass + probs[:, -1].clamp(min=0)
        uniform = torch.rand(total.shape, device=probs.device, dtype=probs.dtype, generator=generator)
        leave = uniform * total < jump_mass
        rows, probs = tuple(r[leave] for r in rows), probs[leave, :-1]
    x[rows] = graph_lib.sample_categorical(probs, generator=generator)
    return x


# --------------------------------------------------------------------------------------------- predictors
class Predictor(abc.ABC):
    """One reverse step from t to t - step_size. `x` [B, L] long, `t` [B, 1] float."""

    def __init__(self, graph: Graph, noise: Noise):
        self.graph = graph
        self.noise = noise

    @abc.abstractmethod
    def update_fn(
        self,
        score_fn: ScoreFn,
        x: torch.Tensor,
        t: torch.Tensor,
        step_size: float,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Reference update on the full [B, L, dim] tensors (any graph), as in the original repository."""

    @abc.abstractmethod
    def absorbing_update_fn(
        self,
        log_score_rows: RowLogScoreFn,
        x: torch.Tensor,
        t: torch.Tensor,
        step_size: float,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Same distribution as `update_fn` for the absorbing graph, computed at masked positions only."""


class EulerPredictor(Predictor):
    """Euler tau-leaping: x ~ onehot(x) + step_size * sigma(t) * Q^T s (paper Algorithm 1)."""

    def update_fn(
        self,
        score_fn: ScoreFn,
        x: torch.Tensor,
        t: torch.Tensor,
        step_size: float,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        sigma, dsigma = self.noise(t)
        score = score_fn(x, sigma)
        rev_rate = step_size * dsigma[..., None] * self.graph.reverse_rate(x, score)
        # `graph.sample_rate` without its global-RNG draw, so that `generator` is honoured
        probs = F.one_hot(x, num_classes=self.graph.dim).to(rev_rate) + rev_rate
        return graph_lib.sample_categorical(probs, generator=generator)

    def absorbing_update_fn(
        self,
        log_score_rows: RowLogScoreFn,
        x: torch.Tensor,
        t: torch.Tensor,
        step_size: float,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        masked = x == self.graph.mask_index
        if not masked.any():
            return x
        sigma, dsigma = self.noise(t)
        batch_index = masked.nonzero(as_tuple=True)[0]
        rate_dt = step_size * _per_row(dsigma, x.shape[0])[batch_index]
        probs = absorbing_euler_probs(log_score_rows(x, sigma, masked), rate_dt)
        return _resample_masked(x, masked, probs, generator, stay_column=True)


class AnalyticPredictor(Predictor):
    """Tweedie tau-leaping: x ~ exp(-dsigma Q) s * exp(dsigma Q)(x, .) with dsigma = sigma_bar(t) - sigma_bar(t - dt)."""

    def _sigmas(self, t: torch.Tensor, step_size: float) -> tuple[torch.Tensor, torch.Tensor]:
        curr_sigma = self.noise(t)[0]
        next_sigma = self.noise(t - step_size)[0]
        return curr_sigma, curr_sigma - next_sigma

    def update_fn(
        self,
        score_fn: ScoreFn,
        x: torch.Tensor,
        t: torch.Tensor,
        step_size: float,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        curr_sigma, dsigma = self._sigmas(t, step_size)
        score = score_fn(x, curr_sigma)
        probs = self.graph.staggered_score(score, dsigma) * self.graph.transp_transition(x, dsigma)
        return graph_lib.sample_categorical(probs, generator=generator)

    def absorbing_update_fn(
        self,
        log_score_rows: RowLogScoreFn,
        x: torch.Tensor,
        t: torch.Tensor,
        step_size: float,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        masked = x == self.graph.mask_index
        if not masked.any():
            return x
        curr_sigma, dsigma = self._sigmas(t, step_size)
        batch_index = masked.nonzero(as_tuple=True)[0]
        dsigma_rows = _per_row(dsigma, x.shape[0])[batch_index]
        probs = absorbing_analytic_probs(log_score_rows(x, curr_sigma, masked), dsigma_rows)
        return _resample_masked(x, masked, probs, generator, stay_column=True)


class NonePredictor(Predictor):
    """No predictor step: only the final denoiser acts."""

    def update_fn(
        self,
        score_fn: ScoreFn,
        x: torch.Tensor,
        t: torch.Tensor,
        step_size: float,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        return x

    def absorbing_update_fn(
        self,
        log_score_rows: RowLogScoreFn,
        x: torch.Tensor,
        t: torch.Tensor,
        step_size: float,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        return x


class Denoiser:
    """Final Tweedie step at t = eps: x0 ~ exp(-sigma Q) s * exp(sigma Q)(x, .), the mask state excluded."""

    def __init__(self, graph: Graph, noise: Noise):
        self.graph = graph
        self.noise = noise

    def update_fn(
        self, score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Reference denoiser on the full tensors: x [B, L], t [B, 1] -> x [B, L]."""
        sigma = self.noise(t)[0]
        score = score_fn(x, sigma)
        probs = self.graph.staggered_score(score, sigma) * self.graph.transp_transition(x, sigma)
        if self.graph.absorb:
            probs = probs[..., :-1]  # never end in the mask state
        return graph_lib.sample_categorical(probs, generator=generator)

    def absorbing_update_fn(
        self,
        log_score_rows: RowLogScoreFn,
        x: torch.Tensor,
        t: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Absorbing denoiser at the masked positions only; the model is not called when none are left."""
        masked = x == self.graph.mask_index
        if not masked.any():
            return x
        sigma = self.noise(t)[0]
        probs = absorbing_denoiser_probs(log_score_rows(x, sigma, masked))
        return _resample_masked(x, masked, probs, generator)


_PREDICTORS: dict[str, type[Predictor]] = {
    "euler": EulerPredictor,
    "analytic": AnalyticPredictor,
    "none": NonePredictor,
}


def get_predictor(name: str) -> type[Predictor]:
    """The predictor class named `name` (`euler`, `analytic` or `none`)."""
    if name not in _PREDICTORS:
        raise ValueError(f"predictor={name!r} is not a valid predictor; choose one of {sorted(_PREDICTORS)}.")
    return _PREDICTORS[name]


# ------------------------------------------------------------------------------------------- the sampler
def _sample_limit(
    graph: Graph, shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """The t = 1 limit [*shape] on `device` (graph.sample_limit takes no generator or device)."""
    if graph.absorb:
        return torch.full(shape, graph.mask_index, dtype=torch.long, device=device)
    if isinstance(graph, graph_lib.Uniform):
        return torch.randint(0, graph.dim, shape, device=device, generator=generator)
    return graph.sample_limit(*shape).to(device)


def _reverse_process(
    scorer: LogScorer,
    graph: Graph,
    noise: Noise,
    x: torch.Tensor,
    *,
    proj: Projection,
    predictor: str,
    steps: int,
    denoise: bool,
    eps: float,
    fast: bool,
    generator: torch.Generator | None,
    show_progress: bool,
) -> torch.Tensor:
    """Run `steps` predictor steps from x [B, L] at t = 1 down to t = eps, then the denoiser; returns [B, L].

    `proj` is applied to the start, after every step and after the denoiser. For the absorbing graph the
    denoiser always runs on the positions still masked, also when `denoise=False`, so that no mask token is
    returned; it never changes an unmasked position, so there `denoise` only decides whether the model is
    called when no mask is left (the fast path never does).
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1.")
    step = get_predictor(predictor)(graph, noise)
    denoiser = Denoiser(graph, noise)
    fast = fast and graph.absorb
    batch = x.shape[0]
    timesteps = torch.linspace(1, eps, steps + 1, device=x.device)
    dt = (1 - eps) / steps

    x = proj(x)
    for i in tqdm(range(steps), desc="sampling", disable=not show_progress, leave=False):
        t = timesteps[i] * torch.ones(batch, 1, device=x.device)
        if fast:
            x = step.absorbing_update_fn(scorer.rows, x, t, dt, generator)
        else:
            x = step.update_fn(scorer.scores, x, t, dt, generator)
        x = proj(x)

    t = timesteps[-1] * torch.ones(batch, 1, device=x.device)
    if fast:
        x = denoiser.absorbing_update_fn(scorer.rows, x, t, generator)
    elif denoise or (graph.absorb and bool((x == graph.mask_index).any())):
        x = denoiser.update_fn(scorer.scores, x, t, generator)
    return proj(x)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _keep_fixed(keep: torch.Tensor, fixed_tokens: torch.Tensor) -> Projection:
    """The projection x -> x with `fixed_tokens` [B, L] written at the `keep` [B, L] positions."""

    def proj(x: torch.Tensor) -> torch.Tensor:
        return torch.where(keep, fixed_tokens, x)

    return proj


def _infer_device(model: Callable[..., torch.Tensor], *tensors: torch.Tensor | None) -> torch.device:
    for tensor in tensors:
        if tensor is not None:
            return tensor.device
    if isinstance(model, nn.Module):
        param = next(model.parameters(), None)
        if param is not None:
            return param.device
    return torch.device("cpu")


def sample(
    model: Callable[..., torch.Tensor],
    graph: Graph,
    noise: Noise,
    *,
    batch_size: int | None = None,
    length: int | None = None,
    fixed_tokens: torch.Tensor | None = None,
    fixed_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    steps: int,
    predictor: str = "analytic",
    denoise: bool = True,
    eps: float = 1e-5,
    generator: torch.Generator | None = None,
    show_progress: bool = False,
    autocast_dtype: torch.dtype | None = None,
    fast: bool = True,
) -> torch.Tensor:
    """Sample token sequences [B, L] (long) from a SEDD model, optionally conditioned on fixed tokens.

    Args:
        model: `model(x [B, L], sigma [B], attention_mask=None) -> log-scores [B, L, dim]`, already in eval
            mode. If its forward accepts `output_mask`, only the rows needed are computed (absorbing graph).
        graph, noise: the diffusion graph and noise schedule the model was trained with.
        batch_size, length: B and L; taken from `fixed_tokens` when it is given (they must then agree).
        fixed_tokens: [B, L] long; at `fixed_mask` positions (and padding positions) the tokens to keep.
        fixed_mask: [B, L] bool; True where the token is given (prompt, suffix, infilling context). These
            positions are set from the start, seen clean by the model at every step and never change.
        attention_mask: [B, L] (1 real, 0 padding). Padding positions are hidden from the model's attention,
            never sampled, and returned as their `fixed_tokens` value (the pad id).
        steps: number of predictor steps between t = 1 and t = eps.
        predictor: `analytic`, `euler` or `none`.
        denoise: run the final denoiser step at t = eps. For the absorbing graph the denoiser always runs on
            the positions that are still masked, so no mask token is ever returned.
        eps: the final time (the original's default 1e-5).
        generator: torch.Generator on the sampling device for reproducible draws (global RNG if None).
        show_progress: show a tqdm bar over the steps.
        autocast_dtype: e.g. torch.bfloat16 on CUDA to run the model under autocast; probabilities are
            always computed in float32.
        fast: absorbing graph only: compute each step at the masked positions only (same distribution as the
            reference update, which `fast=False` runs). Ignored for other graphs.

    Returns:
        [B, L] long tensor of token ids; for the absorbing graph it contains no mask token.
    """
    if fixed_mask is not None and fixed_tokens is None:
        raise ValueError(
            "fixed_mask was given without fixed_tokens; pass the tokens to keep as fixed_tokens."
        )
    if fixed_tokens is not None:
        if fixed_tokens.dim() != 2:
            raise ValueError(f"fixed_tokens must be [B, L]; got shape {tuple(fixed_tokens.shape)}.")
        rows, cols = fixed_tokens.shape
        if (batch_size is not None and batch_size != rows) or (length is not None and length != cols):
            raise ValueError(
                f"batch_size={batch_size}, length={length} disagree with fixed_tokens of shape {(rows, cols)}; "
                "leave them out when fixed_tokens is given."
            )
        batch_size, length = rows, cols
    if batch_size is None or length is None:
        raise ValueError("Pass batch_size and length, or fixed_tokens [B, L] (with fixed_mask).")
    if isinstance(model, nn.Module) and model.training:
        warnings.warn(
            "sampling with a model in training mode (dropout active); call model.eval() first.", stacklevel=2
        )

    shape = (batch_size, length)
    for name, mask in (("fixed_mask", fixed_mask), ("attention_mask", attention_mask)):
        if mask is not None and tuple(mask.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(mask.shape)}; expected {shape} like the tokens.")
    device = _infer_device(model, fixed_tokens, fixed_mask, attention_mask)
    keep = torch.zeros(shape, dtype=torch.bool, device=device)  # positions that never change
    if fixed_tokens is not None:
        fixed_tokens = fixed_tokens.to(device=device, dtype=torch.long)
        if fixed_mask is not None:
            keep = fixed_mask.to(device=device, dtype=torch.bool)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
        padding = attention_mask == 0
        if fixed_tokens is None and bool(padding.any()):
            raise ValueError("attention_mask marks padding; pass fixed_tokens holding the pad id there.")
        keep = keep | padding
    if graph.absorb and fixed_tokens is not None and bool((fixed_tokens[keep] == graph.mask_index).any()):
        raise ValueError(
            f"fixed_tokens holds the mask id {graph.mask_index} at a fixed or padding position; fixed positions "
            "must hold real tokens (use a real pad id, e.g. EOS)."
        )

    proj = _identity if fixed_tokens is None else _keep_fixed(keep, fixed_tokens)

    x = _sample_limit(graph, shape, device, generator)
    scorer = LogScorer(model, attention_mask=attention_mask, autocast_dtype=autocast_dtype)
    # no_grad, not inference_mode: RL feeds the sampled tokens to a model under autograd afterwards. One
    # autocast region around the whole loop: the weights are cast to low precision once, not at every step.
    with torch.no_grad(), scorer._autocast(device):
        return _reverse_process(
            scorer,
            graph,
            noise,
            x,
            proj=proj,
            predictor=predictor,
            steps=steps,
            denoise=denoise,
            eps=eps,
            fast=fast,
            generator=generator,
            show_progress=show_progress,
        )


def prompt_batch(
    prompts: Sequence[Sequence[int]],
    length: int,
    mask_id: int,
    pad_id: int,
    suffixes: Sequence[Sequence[int]] | None = None,
    lengths: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay out one prompt per row for conditional sampling: `(tokens [B, L] long, fixed_mask [B, L] bool)`.

    Row b holds `prompts[b]` at its start and, if given, `suffixes[b]` at its end (infilling); those
    positions are fixed. The positions in between are free and hold `mask_id` (the sampler replaces them).
    `lengths[b]` (default `length`) shortens row b: its positions from `lengths[b]` on hold `pad_id` and are
    fixed too (the suffix then ends at `lengths[b]`), so they come back as `pad_id`.
    """
    n = len(prompts)
    if suffixes is not None and len(suffixes) != n:
        raise ValueError(
            f"{len(suffixes)} suffixes for {n} prompts; pass one suffix per prompt (may be empty)."
        )
    if lengths is not None and len(lengths) != n:
        raise ValueError(f"{len(lengths)} lengths for {n} prompts; pass one length per prompt.")
    tokens = torch.full((n, length), mask_id, dtype=torch.long)
    fixed = torch.zeros((n, length), dtype=torch.bool)
    for b, prompt in enumerate(prompts):
        suffix = list(suffixes[b]) if suffixes is not None else []
        row_length = length if lengths is None else int(lengths[b])
        if not 0 <= row_length <= length:
            raise ValueError(f"lengths[{b}]={row_length} is outside [0, {length}].")
        if len(prompt) + len(suffix) > row_length:
            raise ValueError(
                f"row {b}: prompt ({len(prompt)}) + suffix ({len(suffix)}) tokens do not fit in {row_length}; "
                "raise the length or shorten the prompt."
            )
        tokens[b, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
        fixed[b, : len(prompt)] = True
        if suffix:
            tokens[b, row_length - len(suffix) : row_length] = torch.tensor(suffix, dtype=torch.long)
            fixed[b, row_length - len(suffix) : row_length] = True
        tokens[b, row_length:] = pad_id
        fixed[b, row_length:] = True
    return tokens, fixed


# ------------------------------------------------------------------------ original-repository interface
def get_pc_sampler(
    graph: Graph,
    noise: Noise,
    batch_dims: Sequence[int],
    predictor: str,
    steps: int,
    denoise: bool = True,
    eps: float = 1e-5,
    device: torch.device | str = "cpu",
    proj_fun: Projection | None = None,
    fast: bool = True,
    generator: torch.Generator | None = None,
) -> Callable[[Callable[..., torch.Tensor]], torch.Tensor]:
    """The original `get_pc_sampler`: returns `pc_sampler(model) -> x [*batch_dims]` (batch_dims = (B, L)).

    `proj_fun` (default: identity) maps x [B, L] to x [B, L], e.g. writing a prompt, as in `run_sample_cond`.

    Differences from the original, all in `sample`'s direction: `proj_fun` is also applied after the
    denoiser, the absorbing graph never returns mask tokens (even with `denoise=False`), the absorbing
    fast path is used unless `fast=False`, and `generator` may seed the draws.
    """
    batch_dims = tuple(batch_dims)

    @torch.no_grad()
    def pc_sampler(model: Callable[..., torch.Tensor]) -> torch.Tensor:
        x = _sample_limit(graph, batch_dims, torch.device(device), generator)
        return _reverse_process(
            LogScorer(model),
            graph,
            noise,
            x,
            proj=proj_fun or _identity,
            predictor=predictor,
            steps=steps,
            denoise=denoise,
            eps=eps,
            fast=fast,
            generator=generator,
            show_progress=False,
        )

    return pc_sampler


def get_sampling_fn(
    config: Mapping[str, Any],
    graph: Graph,
    noise: Noise,
    batch_dims: Sequence[int],
    eps: float,
    device: torch.device | str,
) -> Callable[[Callable[..., torch.Tensor]], torch.Tensor]:
    """The original `get_sampling_fn`: a `get_pc_sampler` from `config.sampling.{predictor, steps, noise_removal}`."""
    sampling_cfg = config["sampling"]
    return get_pc_sampler(
        graph=graph,
        noise=noise,
        batch_dims=batch_dims,
        predictor=sampling_cfg["predictor"],
        steps=sampling_cfg["steps"],
        denoise=sampling_cfg["noise_removal"],
        eps=eps,
        device=device,
    )
