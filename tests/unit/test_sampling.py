"""The sampler: conditioning and padding, no mask left, the absorbing fast path against the reference update
(exact formula, same-noise agreement and per-step transition frequencies), recovery of a factorised target from
its exact score, reproducibility and the original `get_pc_sampler` interface.

Fake models return deterministic log-scores, so the exact distributions are known. Statistical tests use fixed
seeds (they are deterministic) and bounds that a correct sampler passes with probability > 0.999.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chi2
from torch import nn

import graph_lib
import noise_lib
import sampling
from graph_lib import Absorbing, Uniform

TOKENS = 5  # real tokens of the small vocabulary; the absorbing graph adds the mask 5 (dim 6)
MASK = TOKENS
PAD = 0


# ------------------------------------------------------------------------------------------------ fakes
class FakeModel(nn.Module):
    """Base of the fake score networks: created in eval mode, as the sampler expects."""

    def __init__(self):
        super().__init__()
        self.eval()


class TableModel(FakeModel):
    """Log-scores from a fixed table [L, dim] at every step, whatever x and sigma (for one-step tests)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.table[None].expand(x.shape[0], -1, -1).clone()


class FactorizedAbsorbing(FakeModel):
    """Exact absorbing log-scores of the product target p [L, V]: log(p_y e^-sigma / (1 - e^-sigma)) at masked
    positions (0 at the mask entry); 0 everywhere at unmasked positions (0 at the input token)."""

    def __init__(self, p: torch.Tensor):
        super().__init__()
        self.register_buffer("log_p", p.log())

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, attention_mask: torch.Tensor | None = None):
        batch, length = x.shape
        log_ratio = self.log_p[None] - torch.log(torch.expm1(sigma))[:, None, None]
        out = torch.cat([log_ratio, torch.zeros(batch, length, 1)], dim=-1)
        return torch.where((x == self.log_p.shape[1])[..., None], out, torch.zeros_like(out))


class FactorizedUniform(FakeModel):
    """Exact uniform-graph log-scores of the product target p [L, V]: log p_t(y) - log p_t(x) per position,
    with p_t = e^-sigma p + (1 - e^-sigma) / V."""

    def __init__(self, p: torch.Tensor):
        super().__init__()
        self.register_buffer("p", p)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, attention_mask: torch.Tensor | None = None):
        keep = torch.exp(-sigma)[:, None, None]
        log_pt = (keep * self.p[None] + (1 - keep) / self.p.shape[1]).log()
        return log_pt - log_pt.gather(-1, x[..., None])


class Recorder(FakeModel):
    """Wraps a model and records the inputs of every call."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, attention_mask: torch.Tensor | None = None):
        self.calls.append((x.clone(), sigma.clone(), attention_mask))
        return self.inner(x, sigma)


class RowOutputModel(FakeModel):
    """Accepts `output_mask` like model.SEDD: then returns only the selected rows [N, dim]."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.row_calls = 0

    def forward(self, x, sigma, attention_mask=None, output_mask=None):
        out = self.inner(x, sigma)
        if output_mask is None:
            return out
        self.row_calls += 1
        return out[output_mask]


def product_target(length: int, tokens: int = TOKENS, seed: int = 0) -> torch.Tensor:
    """A random product distribution p [length, tokens], rows summing to 1, all entries >= 0.02."""
    p = torch.rand(length, tokens, generator=torch.Generator().manual_seed(seed)) + 0.1
    return p / p.sum(dim=-1, keepdim=True)


def step_table(length: int, total: float = 1.2, seed: int = 1) -> torch.Tensor:
    """Log-scores [length, TOKENS + 1]: real-token scores summing to `total`, mask entries near 0 (not all 0,
    so that the test sees whether the model's mask entry is used as the reference uses it)."""
    s = torch.rand(length, TOKENS, generator=torch.Generator().manual_seed(seed)) + 0.05
    s = s / s.sum(dim=-1, keepdim=True) * total
    mask_entry = 0.1 * torch.randn(length, 1, generator=torch.Generator().manual_seed(seed + 1))
    return torch.cat([s.log(), mask_entry], dim=-1)


def loglinear() -> noise_lib.Noise:
    return noise_lib.LogLinearNoise()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------- prompt_batch
def test_prompt_batch_layout():
    tokens, fixed = sampling.prompt_batch(
        [[1, 2, 3], [4, 4, 4, 4, 4, 4, 4], [2]],
        16,
        mask_id=MASK,
        pad_id=PAD,
        suffixes=[[], [], [3, 1]],
        lengths=[16, 16, 10],
    )
    assert tokens.dtype == torch.long and fixed.dtype == torch.bool and tokens.shape == fixed.shape == (3, 16)
    assert tokens[0, :3].tolist() == [1, 2, 3] and (tokens[0, 3:] == MASK).all()
    assert fixed[0].tolist() == [True] * 3 + [False] * 13
    assert fixed[1].sum() == 7 and (tokens[1, 7:] == MASK).all()
    # row 2: prompt at the start, suffix ending at its own length 10, pad from there on (fixed)
    assert tokens[2].tolist() == [2] + [MASK] * 7 + [3, 1] + [PAD] * 6
    assert fixed[2].tolist() == [True] + [False] * 7 + [True] * 8


def test_prompt_batch_rejects_overlong_prompt():
    with pytest.raises(ValueError, match="do not fit"):
        sampling.prompt_batch([[1] * 5], 6, mask_id=MASK, pad_id=PAD, suffixes=[[2, 2]])


# ----------------------------------------------------------------------------------------- conditioning
@pytest.mark.parametrize(
    "graph, predictor, fast",
    [
        (Absorbing(TOKENS), "analytic", True),
        (Absorbing(TOKENS), "euler", True),
        (Absorbing(TOKENS), "analytic", False),
        (Uniform(TOKENS), "analytic", False),
        (Uniform(TOKENS), "euler", False),
    ],
)
def test_fixed_positions_never_change_and_are_seen_clean(graph, predictor, fast):
    length = 16
    target = product_target(length)
    inner = FactorizedAbsorbing(target) if graph.absorb else FactorizedUniform(target)
    model = Recorder(inner)
    prompts = [[1, 2, 3], [4, 4, 1, 1, 2, 3, 4], [3, 3]]
    tokens, fixed = sampling.prompt_batch(
        prompts, length, mask_id=MASK, pad_id=PAD, suffixes=[[], [], [2, 0, 1]]
    )
    out = sampling.sample(
        model,
        graph,
        loglinear(),
        fixed_tokens=tokens,
        fixed_mask=fixed,
        steps=8,
        predictor=predictor,
        fast=fast,
        generator=seeded(0),
    )
    assert out.shape == (3, length) and out.dtype == torch.long
    assert torch.equal(out[fixed], tokens[fixed])
    assert len(model.calls) >= 2
    for x, sigma, _ in model.calls:  # the model sees the conditioning clean at every step
        assert torch.equal(x[fixed], tokens[fixed])
        assert sigma.shape == (3,)
    if graph.absorb:
        assert not (out == MASK).any()


@pytest.mark.parametrize("graph", [Absorbing(TOKENS), Uniform(TOKENS)])
def test_padding_positions_stay_pad_and_are_hidden(graph):
    length = 12
    target = product_target(length)
    model = Recorder(FactorizedAbsorbing(target) if graph.absorb else FactorizedUniform(target))
    tokens, fixed = sampling.prompt_batch(
        [[1, 2, 3], [2, 2, 2, 2, 2, 2, 2]], length, mask_id=MASK, pad_id=PAD
    )
    attention_mask = (torch.arange(length)[None] < torch.tensor([[9], [12]])).long()
    tokens = tokens.masked_fill(attention_mask == 0, PAD)
    out = sampling.sample(
        model,
        graph,
        loglinear(),
        fixed_tokens=tokens,
        fixed_mask=fixed,
        attention_mask=attention_mask,
        steps=6,
        generator=seeded(0),
    )
    padding = attention_mask == 0
    assert (out[padding] == PAD).all() and torch.equal(out[fixed], tokens[fixed])
    for x, _, seen_mask in model.calls:
        assert seen_mask is attention_mask and (x[padding] == PAD).all()
    if graph.absorb:
        assert not (out == MASK).any()


def test_invalid_conditioning_raises():
    graph, model = Absorbing(TOKENS), FactorizedAbsorbing(product_target(4))
    with pytest.raises(ValueError, match="mask id"):
        sampling.sample(
            model,
            graph,
            loglinear(),
            fixed_tokens=torch.full((1, 4), MASK),
            fixed_mask=torch.ones(1, 4, dtype=torch.bool),
            steps=2,
        )
    with pytest.raises(ValueError, match="fixed_tokens holding the pad id"):
        sampling.sample(
            model, graph, loglinear(), batch_size=1, length=4, attention_mask=torch.zeros(1, 4), steps=2
        )
    with pytest.raises(ValueError, match="batch_size and length"):
        sampling.sample(model, graph, loglinear(), steps=2)
    with pytest.raises(ValueError, match="valid predictor"):
        sampling.sample(model, graph, loglinear(), batch_size=1, length=4, steps=2, predictor="ancestral")


# ------------------------------------------------------------------------------------------ no mask left
@pytest.mark.parametrize("predictor", ["analytic", "euler", "none"])
@pytest.mark.parametrize("denoise", [True, False])
@pytest.mark.parametrize("fast", [True, False])
def test_absorbing_sampling_leaves_no_mask(predictor, denoise, fast):
    # scores of e^-20 almost never unmask during the predictor steps, so the final step must fill the masks
    table = torch.cat([torch.full((10, TOKENS), -20.0), torch.zeros(10, 1)], dim=-1)
    out = sampling.sample(
        TableModel(table),
        Absorbing(TOKENS),
        loglinear(),
        batch_size=4,
        length=10,
        steps=4,
        predictor=predictor,
        denoise=denoise,
        fast=fast,
        generator=seeded(0),
    )
    assert out.shape == (4, 10) and not (out == MASK).any() and (out >= 0).all()


# --------------------------------------------------------------------------- fast path vs reference math
def reference_step_probs(predictor: str, log_score: torch.Tensor, t: float, dt: float) -> torch.Tensor:
    """Exact per-position probabilities [L, dim] of the reference update at x = mask, in float64, from the
    graph's own formulas (staggered_score * transp_transition, or onehot + rate), normalised."""
    graph, noise = Absorbing(TOKENS), loglinear()
    score = log_score.double().exp()[None]  # [1, L, dim]
    x = torch.full(score.shape[:2], MASK)
    tt = torch.tensor([[t]], dtype=torch.float64)
    if predictor == "analytic":
        dsigma = noise(tt)[0] - noise(tt - dt)[0]
        probs = graph.staggered_score(score, dsigma) * graph.transp_transition(x, dsigma)
    elif predictor == "euler":
        rate = noise(tt)[1]
        probs = torch.nn.functional.one_hot(x, graph.dim).double() + dt * rate[
            ..., None
        ] * graph.reverse_rate(x, score)
    else:  # denoiser at t
        sigma = noise(tt)[0]
        probs = (graph.staggered_score(score, sigma) * graph.transp_transition(x, sigma))[..., :-1]
    probs = probs[0].clamp(min=0)
    return probs / probs.sum(dim=-1, keepdim=True)


def fast_rows(predictor: str, log_score: torch.Tensor, t: float, dt: float) -> torch.Tensor:
    """The fast path's row probabilities [L, K] for the same step, normalised."""
    noise = loglinear()
    tt = torch.full((log_score.shape[0],), t)
    if predictor == "analytic":
        rows = sampling.absorbing_analytic_probs(log_score, noise(tt)[0] - noise(tt - dt)[0])
    elif predictor == "euler":
        rows = sampling.absorbing_euler_probs(log_score, dt * noise(tt)[1])
    else:
        rows = sampling.absorbing_denoiser_probs(log_score)
    rows = rows.double().clamp(min=0)
    return rows / rows.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("predictor", ["analytic", "euler", "denoiser"])
@pytest.mark.parametrize("t, dt", [(0.6, 0.25), (0.05, 0.01), (0.999, 0.5)])
def test_fast_rows_equal_reference_formula(predictor, t, dt):
    log_score = step_table(7, total=0.9) + 0.3 * torch.randn(7, TOKENS + 1, generator=seeded(3))
    torch.testing.assert_close(
        fast_rows(predictor, log_score, t, dt),
        reference_step_probs(predictor, log_score, t, dt),
        rtol=1e-5,
        atol=1e-6,
    )


def one_step(predictor: str, model: nn.Module, x: torch.Tensor, t: float, dt: float, fast: bool, seed: int):
    """One predictor (or the denoiser) step on x [B, L] at time t, fast or reference path."""
    graph, noise = Absorbing(TOKENS), loglinear()
    scorer = sampling.LogScorer(model)
    tt = torch.full((x.shape[0], 1), t)
    with torch.no_grad():
        if predictor == "denoiser":
            step = sampling.Denoiser(graph, noise)
            if fast:
                return step.absorbing_update_fn(scorer.rows, x, tt, seeded(seed))
            return step.update_fn(scorer.scores, x, tt, seeded(seed))
        step = sampling.get_predictor(predictor)(graph, noise)
        if fast:
            return step.absorbing_update_fn(scorer.rows, x, tt, dt, seeded(seed))
        return step.update_fn(scorer.scores, x, tt, dt, seeded(seed))


@pytest.mark.parametrize("predictor", ["analytic", "euler", "denoiser"])
def test_fast_step_transition_frequencies_match_exact_probs(predictor):
    """20,000 one-step draws (5,000 per masked position) of the fast path against the exact reference
    probabilities: chi-square over 4 positions x 5 degrees of freedom, and a total-variation bound."""
    length, draws, t, dt = 5, 5000, 0.6, 0.25
    table = step_table(length)
    x = torch.full((draws, length), MASK)
    x[:, 0] = 2  # an unmasked position: never changes
    out = one_step(predictor, TableModel(table), x, t, dt, fast=True, seed=0)
    assert (out[:, 0] == 2).all()
    exact = reference_step_probs(predictor, table, t, dt)  # [L, K]
    stat, dof = 0.0, 0
    for pos in range(1, length):
        counts = torch.bincount(out[:, pos], minlength=TOKENS + 1)[: exact.shape[1]].double()
        assert counts.sum() == draws  # (the denoiser never draws the mask)
        expected = draws * exact[pos]
        assert (expected > 50).all()  # every category well populated: the chi-square approximation holds
        stat += float(((counts - expected) ** 2 / expected).sum())
        dof += exact.shape[1] - 1
        assert 0.5 * float((counts / draws - exact[pos]).abs().sum()) < 0.025
    assert chi2.sf(stat, dof) > 1e-3, f"chi2={stat:.1f} with {dof} dof"


def test_two_stage_draw_has_the_one_draw_law():
    """`_resample_masked` with a stay column (leave the mask or not, then the token on leaving rows) against the
    normalised probabilities with negative entries at 0: a row that mostly stays, one whose stay entry is negative
    (always leaves) and one split evenly. 30,000 draws per row, chi-square and total variation."""
    probs = torch.tensor(
        [[0.02, 0.05, 0.0, 0.03, 0.9], [0.5, 0.2, 0.1, 0.2, -0.3], [0.1, 0.1, 0.2, 0.1, 0.5]],
        dtype=torch.float32,
    )
    draws = 30000
    masked = torch.ones(draws, 3, dtype=torch.bool)
    x = torch.full((draws, 3), 4)
    out = sampling._resample_masked(x, masked, probs.repeat(draws, 1), seeded(9), stay_column=True)
    exact = probs.double().clamp(min=0)
    exact = exact / exact.sum(dim=-1, keepdim=True)
    stat, dof = 0.0, 0
    for row in range(3):
        counts = torch.bincount(out[:, row], minlength=5).double()
        support = exact[row] > 0
        assert counts[~support].sum() == 0  # zero and negative entries are never drawn
        expected = draws * exact[row][support]
        stat += float(((counts[support] - expected) ** 2 / expected).sum())
        dof += int(support.sum()) - 1
        assert 0.5 * float((counts / draws - exact[row]).abs().sum()) < 0.01
    assert chi2.sf(stat, dof) > 1e-3, f"chi2={stat:.1f} with {dof} dof"


@pytest.mark.parametrize("predictor", ["denoiser"])
def test_fast_step_equals_reference_step_with_same_noise(predictor):
    """With every position masked both denoisers draw their uniforms for the same [B * L, K] rows in the same
    order, so the same generator seed gives the same tokens (the probabilities differ only by float32 rounding).
    The fast predictors draw in two stages (leave the mask or not, then the token on leaving rows only), with
    other random numbers but the same law: see test_fast_step_transition_frequencies_match_exact_probs."""
    length = 50
    table = step_table(length, total=1.0) + 0.5 * torch.randn(length, TOKENS + 1, generator=seeded(5))
    x = torch.full((40, length), MASK)
    fast = one_step(predictor, TableModel(table), x, 0.6, 0.25, fast=True, seed=7)
    reference = one_step(predictor, TableModel(table), x, 0.6, 0.25, fast=False, seed=7)
    assert torch.equal(fast, reference)
    assert len(fast.unique()) > 3  # a non-trivial step


def test_row_output_model_is_called_on_masked_rows_only():
    table = step_table(6)
    model = RowOutputModel(TableModel(table))
    x = torch.full((3, 6), MASK)
    x[:, :2] = 1
    out = one_step("analytic", model, x, 0.6, 0.25, fast=True, seed=0)
    same = one_step("analytic", TableModel(table), x, 0.6, 0.25, fast=True, seed=0)
    assert model.row_calls == 1 and torch.equal(out, same)


# ------------------------------------------------------------------------------- exact score -> target p
def total_variation(samples: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per-position TV distance [L] between the empirical frequencies of samples [N, L] and p [L, V]."""
    freqs = torch.stack(
        [torch.bincount(col, minlength=p.shape[1])[: p.shape[1]] for col in samples.T]
    ).double()
    return 0.5 * (freqs / samples.shape[0] - p.double()).abs().sum(dim=-1)


@pytest.mark.parametrize(
    "graph, predictor, fast",
    [
        (Absorbing(TOKENS), "analytic", True),
        (Absorbing(TOKENS), "analytic", False),
        (Absorbing(TOKENS), "euler", True),
        (Uniform(TOKENS), "analytic", False),
    ],
)
def test_exact_score_recovers_factorised_target(graph, predictor, fast):
    """With the exact score of a product target the analytic sampler is exact step by step, so the samples'
    frequencies match p up to sampling noise (TV ~ 0.01 for 4,000 samples over 5 tokens)."""
    length, n = 3, 4000
    p = product_target(length, seed=11)
    model = FactorizedAbsorbing(p) if graph.absorb else FactorizedUniform(p)
    out = sampling.sample(
        model,
        graph,
        loglinear(),
        batch_size=n,
        length=length,
        steps=8,
        predictor=predictor,
        fast=fast,
        generator=seeded(0),
    )
    assert (out < TOKENS).all()
    tv = total_variation(out, p)
    assert (tv < 0.035).all(), tv


# ------------------------------------------------------------------------------------------ reproducibility
@pytest.mark.parametrize("graph", [Absorbing(TOKENS), Uniform(TOKENS)])
def test_same_seed_same_tokens_different_seed_different(graph):
    p = product_target(16)
    model = FactorizedAbsorbing(p) if graph.absorb else FactorizedUniform(p)

    def run(generator=None):
        return sampling.sample(
            model,
            graph,
            loglinear(),
            batch_size=4,
            length=16,
            steps=8,
            predictor="euler",
            generator=generator,
        )

    assert torch.equal(run(seeded(0)), run(seeded(0)))
    assert not torch.equal(run(seeded(0)), run(seeded(1)))
    torch.manual_seed(3)
    first = run()
    torch.manual_seed(3)
    assert torch.equal(first, run())


# ---------------------------------------------------------------------------------- options and interface
def test_autocast_progress_bar_and_training_mode_warning(capsys):
    model = FactorizedAbsorbing(product_target(8))
    kwargs = dict(batch_size=2, length=8, steps=3, generator=seeded(0))
    out = sampling.sample(
        model, Absorbing(TOKENS), loglinear(), autocast_dtype=torch.bfloat16, show_progress=True, **kwargs
    )
    assert not (out == MASK).any()
    assert "sampling" in capsys.readouterr().err
    model.train()
    with pytest.warns(UserWarning, match="model.eval"):
        sampling.sample(model, Absorbing(TOKENS), loglinear(), **kwargs)


@pytest.mark.parametrize("graph", [Absorbing(TOKENS), Uniform(TOKENS)])
@pytest.mark.parametrize("predictor", ["analytic", "euler", "none"])
def test_get_pc_sampler_compat(graph, predictor):
    p = product_target(7)
    model = FactorizedAbsorbing(p) if graph.absorb else FactorizedUniform(p)
    pc_sampler = sampling.get_pc_sampler(graph, loglinear(), (3, 7), predictor, steps=5, device="cpu")
    out = pc_sampler(model)
    assert out.shape == (3, 7) and out.dtype == torch.long and (out < TOKENS).all()

    def proj(x: torch.Tensor) -> torch.Tensor:  # run_sample_cond's projection: a fixed prefix
        x = x.clone()
        x[:, :2] = torch.tensor([4, 1])
        return x

    out = sampling.get_pc_sampler(graph, loglinear(), (3, 7), predictor, steps=5, proj_fun=proj)(model)
    assert (out[:, :2] == torch.tensor([4, 1])).all()


def test_get_sampling_fn_reads_the_sampling_config():
    config = {"sampling": {"predictor": "euler", "steps": 4, "noise_removal": True}}
    fn = sampling.get_sampling_fn(config, Absorbing(TOKENS), loglinear(), (2, 5), 1e-5, "cpu")
    out = fn(FactorizedAbsorbing(product_target(5)))
    assert out.shape == (2, 5) and not (out == MASK).any()
    assert sampling.get_predictor("analytic") is sampling.AnalyticPredictor


def test_real_model_prompted_sampling(tiny_model, tiny_config):
    """The tiny SEDD (which accepts output_mask): prompts kept, no mask, scorer rows equal full output rows."""
    graph, noise = graph_lib.get_graph(tiny_config), noise_lib.get_noise(tiny_config)
    tokens, fixed = sampling.prompt_batch(
        [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11]], 16, graph.mask_index, 0, suffixes=[[4, 4], []]
    )
    out = sampling.sample(tiny_model, graph, noise, fixed_tokens=tokens, fixed_mask=fixed, steps=6)
    assert torch.equal(out[fixed], tokens[fixed]) and not (out == graph.mask_index).any()
    scorer = sampling.LogScorer(tiny_model)
    assert scorer.row_output
    with torch.no_grad():
        sigma = torch.tensor([0.3, 2.0])
        torch.testing.assert_close(scorer.rows(tokens, sigma, ~fixed), scorer(tokens, sigma)[~fixed])
