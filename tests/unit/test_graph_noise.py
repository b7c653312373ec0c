"""Graphs (rate matrices, transitions, staggered score, score entropy) and noise schedules.

Score-entropy accuracy: the library (float32, Bregman form) is compared with the ORIGINAL `pos - neg + const`
formula evaluated in float64 on the same float32 scores. rtol 1e-5 on the total: the library's float32 error is
a few ulp per entry (relative ~1e-7) amplified at most by the O(10) log-ratios at sigma = 1e-4 / 10, so 1e-5 is
~100x the float32 unit roundoff and far below any formula error (e.g. a 1% error in the uniform `ratio`).
"""

from __future__ import annotations

import math

import pytest
import torch

import graph_lib
import noise_lib
from graph_lib import Absorbing, Uniform
from tests.reference_sedd import original_score_entropy_absorb, original_score_entropy_uniform

SIGMAS = [1e-4, 1e-3, 1e-2, 0.1, 0.49, 0.51, 1.0, 3.0, 10.0]


def q_matrix(graph: graph_lib.Graph) -> torch.Tensor:
    """Explicit Q [dim, dim] in float64 whose column i is graph.rate(i) (built under a float64 default dtype:
    Uniform.rate fills with the default dtype)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        cols = [graph.rate(torch.tensor(i)).double() for i in range(graph.dim)]
    finally:
        torch.set_default_dtype(previous)
    return torch.stack(cols, dim=1)


def graphs(n: int = 4):
    return [Uniform(n), Absorbing(n - 1)]


# -------------------------------------------------------------------------------------------- construction
def test_get_graph_and_dims():
    assert isinstance(graph_lib.get_graph({"graph": {"type": "absorb"}, "tokens": 50}), Absorbing)
    absorb = graph_lib.get_graph({"graph": {"type": "absorb"}, "tokens": 50})
    assert absorb.dim == 51 and absorb.mask_index == 50 and absorb.absorb
    uniform = graph_lib.get_graph({"graph": {"type": "uniform"}, "tokens": 50})
    assert isinstance(uniform, Uniform) and uniform.dim == 50 and not uniform.absorb
    with pytest.raises(ValueError, match="graph.type"):
        graph_lib.get_graph({"graph": {"type": "nope"}, "tokens": 50})


def test_hand_computed_rate_matrices():
    # Uniform(3): Q = 11^T / 3 - I
    expected_uniform = torch.tensor([[-2, 1, 1], [1, -2, 1], [1, 1, -2]], dtype=torch.float64) / 3
    torch.testing.assert_close(q_matrix(Uniform(3)), expected_uniform)
    # Absorbing(3 tokens) = 4 states, mask = 3: column i = e_mask - e_i, mask column 0
    expected_absorb = torch.tensor(
        [[-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, 0], [1, 1, 1, 0]], dtype=torch.float64
    )
    torch.testing.assert_close(q_matrix(Absorbing(3)), expected_absorb)


@pytest.mark.parametrize("graph", graphs(), ids=["uniform", "absorb"])
def test_rate_columns_sum_to_zero_and_transp_rate_is_row(graph):
    q = q_matrix(graph)
    torch.testing.assert_close(q.sum(dim=0), torch.zeros(graph.dim, dtype=torch.float64))
    for i in range(graph.dim):
        torch.testing.assert_close(graph.transp_rate(torch.tensor(i)).double(), q[i])


# -------------------------------------------------------------------------------------------- transitions
def test_hand_computed_transitions():
    sigma = torch.tensor(0.7, dtype=torch.float64)
    stay = math.exp(-0.7)
    # Uniform(4): p(j | i) = (1 - e^-s) / 4 off the diagonal, e^-s + (1 - e^-s) / 4 on it
    got = Uniform(4).transition(torch.tensor([2]), sigma[None])
    move = (1 - stay) / 4
    torch.testing.assert_close(got, torch.tensor([[move, move, stay + move, move]], dtype=torch.float64))
    # Absorbing(3): p(i | i) = e^-s, p(mask | i) = 1 - e^-s; the mask is absorbing
    got = Absorbing(3).transition(torch.tensor([1, 3]), sigma.expand(2))
    expected = torch.tensor([[0, stay, 0, 1 - stay], [0, 0, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("graph", graphs(4) + graphs(6), ids=["uniform4", "absorb4", "uniform6", "absorb6"])
@pytest.mark.parametrize("sigma", [1e-3, 0.3, 2.5])
def test_transition_is_matrix_exponential(graph, sigma):
    """transition(i) is column i of exp(sigma Q), transp_transition(i) row i; both are distributions."""
    expm = torch.linalg.matrix_exp(sigma * q_matrix(graph))
    states = torch.arange(graph.dim)
    sig = torch.full((graph.dim,), sigma, dtype=torch.float64)
    trans = graph.transition(states, sig)  # row i = column i of expm
    transp = graph.transp_transition(states, sig)  # row i = row i of expm
    torch.testing.assert_close(trans, expm.T, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(transp, expm, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(trans.sum(-1), torch.ones(graph.dim, dtype=torch.float64))
    # transp_transition(i) is row i of the matrix whose columns are transition(j)
    columns = torch.stack([graph.transition(torch.tensor(j), sig[0]) for j in range(graph.dim)], dim=1)
    torch.testing.assert_close(transp, columns)
    # columns of expm (distributions) sum to 1
    torch.testing.assert_close(expm.sum(0), torch.ones(graph.dim, dtype=torch.float64))


@pytest.mark.parametrize("graph", graphs(), ids=["uniform", "absorb"])
def test_transition_broadcasts_batched_sigma(graph):
    x = torch.tensor([[0, 1, 2], [3, 2, 1]])
    sigma = torch.tensor([[0.2], [1.5]], dtype=torch.float64)
    got = graph.transition(x, sigma)
    for b in range(2):
        for pos in range(3):
            torch.testing.assert_close(got[b, pos], graph.transition(x[b, pos], sigma[b, 0]))
    got_t = graph.transp_transition(x, sigma)
    for b in range(2):
        for pos in range(3):
            torch.testing.assert_close(got_t[b, pos], graph.transp_transition(x[b, pos], sigma[b, 0]))


@pytest.mark.parametrize("graph", graphs(5), ids=["uniform", "absorb"])
def test_sample_transition_frequencies(graph):
    torch.manual_seed(0)
    n = 40_000
    sigma = torch.tensor(0.8)
    for start in (0, graph.dim - 1):
        samples = graph.sample_transition(torch.full((n,), start), sigma)
        freq = torch.bincount(samples, minlength=graph.dim).double() / n
        probs = graph.transition(torch.tensor(start), sigma.double())
        # 5 standard errors of a binomial frequency
        tol = 5 * torch.sqrt(probs * (1 - probs) / n) + 1e-12
        assert torch.all((freq - probs).abs() <= tol), (start, freq, probs)


@pytest.mark.parametrize("graph", graphs(), ids=["uniform", "absorb"])
def test_sample_limit(graph):
    torch.manual_seed(0)
    samples = graph.sample_limit(2, 3000)
    assert samples.shape == (2, 3000) and samples.dtype == torch.int64
    if graph.absorb:
        assert torch.all(samples == graph.dim - 1)
    else:
        freq = torch.bincount(samples.flatten(), minlength=graph.dim).double() / samples.numel()
        assert (freq - 1 / graph.dim).abs().max() < 0.03


# -------------------------------------------------------------------------------------------- scores
def test_staggered_score_hand_computed():
    score = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    d = torch.tensor([0.5], dtype=torch.float64)
    e = math.exp(0.5)
    # Uniform: e^d s + (1 - e^d) mean(s)
    expected = e * score + (1 - e) * 2.5
    torch.testing.assert_close(Uniform(4).staggered_score(score, d), expected)
    # Absorbing (mask = last): e^d s, plus (1 - e^d) sum(s) on the mask entry
    expected = e * score
    expected[0, 3] += (1 - e) * 10.0
    torch.testing.assert_close(Absorbing(3).staggered_score(score, d), expected)


@pytest.mark.parametrize("graph", graphs(5), ids=["uniform", "absorb"])
def test_staggered_score_is_exp_minus_dsigma_q(graph):
    gen = torch.Generator().manual_seed(0)
    score = torch.rand(3, 2, graph.dim, generator=gen, dtype=torch.float64)
    dsigma = torch.tensor([[0.05], [0.4], [1.3]], dtype=torch.float64)
    before = score.clone()
    got = graph.staggered_score(score, dsigma)
    assert torch.equal(score, before), "staggered_score must not modify its input"
    q = q_matrix(graph)
    for b in range(3):
        expm = torch.linalg.matrix_exp(-dsigma[b, 0] * q)
        torch.testing.assert_close(got[b], score[b] @ expm.T)


@pytest.mark.parametrize("graph", graphs(5), ids=["uniform", "absorb"])
def test_reverse_rate_rows_sum_to_zero(graph):
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, graph.dim, (4, 6), generator=gen)
    x[0, 0] = graph.dim - 1
    score = torch.rand(4, 6, graph.dim, generator=gen, dtype=torch.float64) + 0.1
    rate = graph.reverse_rate(x, score)
    torch.testing.assert_close(rate.sum(-1), torch.zeros(4, 6, dtype=torch.float64))
    q = q_matrix(graph)
    off = torch.ones_like(rate, dtype=torch.bool).scatter(-1, x[..., None], False)
    expected = q[x] * score  # Q(x, y) s_y off the diagonal
    torch.testing.assert_close(rate[off], expected[off])
    assert torch.all(rate[off] >= 0)


# -------------------------------------------------------------------------------------------- score entropy
def true_log_ratios(graph: graph_lib.Graph, sigma: float, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """log p_sigma(y | x0) - log p_sigma(x | x0) from the explicit matrix exponential, [N, dim] float64."""
    p = torch.linalg.matrix_exp(sigma * q_matrix(graph))  # p[y, x0]
    cond = p[:, x0].T  # [N, dim]: p(. | x0)
    return cond.log() - cond.gather(-1, x[:, None]).log()


@pytest.mark.parametrize("graph", graphs(6), ids=["uniform", "absorb"])
@pytest.mark.parametrize("sigma", [0.05, 0.7, 3.0])
def test_score_entropy_zero_at_true_ratios_and_minimal(graph, sigma):
    dim = graph.dim
    if graph.absorb:  # states with nonzero score entropy: x = mask, any x0
        x = torch.full((dim - 1,), dim - 1)
        x0 = torch.arange(dim - 1)
    else:  # every (x, x0) pair
        x = torch.arange(dim).repeat_interleave(dim)
        x0 = torch.arange(dim).repeat(dim)
    sig = torch.full((len(x),), sigma, dtype=torch.float64)
    log_r = true_log_ratios(graph, sigma, x, x0)  # -inf where the ratio is 0
    entropy = graph.score_entropy(log_r, sig, x, x0)
    torch.testing.assert_close(entropy, torch.zeros_like(entropy), atol=1e-12, rtol=0)

    gen = torch.Generator().manual_seed(0)
    finite = torch.isfinite(log_r)
    for _ in range(5):
        bump = 0.3 * torch.randn(log_r.shape, generator=gen, dtype=torch.float64)
        perturbed = torch.where(finite, log_r + bump, log_r)
        assert torch.all(graph.score_entropy(perturbed, sig, x, x0) > 0)
    # the gradient vanishes at the optimum (finite entries); every entry y != x matters
    score = torch.where(finite, log_r, torch.full_like(log_r, -30.0)).requires_grad_()
    graph.score_entropy(score, sig, x, x0).sum().backward()
    torch.testing.assert_close(score.grad, torch.zeros_like(score), atol=1e-9, rtol=0)
    if graph.absorb:  # each real token y != x0 (true ratio 0) given log-score -2 costs e^-2
        bumped = torch.where(finite, log_r, torch.full_like(log_r, -2.0))
        expected = torch.full((len(x),), (dim - 2) * math.exp(-2.0), dtype=torch.float64)
        torch.testing.assert_close(graph.score_entropy(bumped, sig, x, x0), expected)


def test_absorbing_score_entropy_is_zero_off_the_mask():
    graph = Absorbing(5)
    gen = torch.Generator().manual_seed(0)
    score = torch.randn(4, graph.dim, generator=gen)
    x = torch.tensor([0, 1, 2, 5])
    x0 = torch.tensor([0, 1, 2, 3])
    entropy = graph.score_entropy(score, torch.full((4,), 0.5), x, x0)
    assert torch.equal(entropy[:3], torch.zeros(3)) and entropy[3] > 0


def random_case(graph: graph_lib.Graph, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, graph.dim - 1 if graph.absorb else graph.dim, (n,), generator=gen)
    if graph.absorb:
        x = torch.where(torch.rand(n, generator=gen) < 0.7, graph.dim - 1, x0)
    else:
        x = torch.where(
            torch.rand(n, generator=gen) < 0.5, torch.randint(0, graph.dim, (n,), generator=gen), x0
        )
    score = torch.randn(n, graph.dim, generator=gen) * 2 - 1  # float32 log-scores
    return score, x, x0


@pytest.mark.parametrize("kind", ["uniform", "absorb"])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_score_entropy_float32_matches_float64_original(kind, sigma):
    graph = graph_lib.get_graph({"graph": {"type": kind}, "tokens": 50})
    score, x, x0 = random_case(graph, 256, seed=int(sigma * 1e4))
    sig = torch.full((len(x),), sigma)
    ours = graph.score_entropy(score, sig, x, x0)
    assert ours.dtype == torch.float32 and torch.all(torch.isfinite(ours))
    original = original_score_entropy_absorb if graph.absorb else original_score_entropy_uniform
    ref = original(score, sig.double(), x, x0)
    assert torch.all(ref >= -1e-9 * ref.abs().max())  # score entropy is non-negative
    total, ref_total = ours.double().sum(), ref.sum()
    assert abs(total - ref_total) <= 1e-5 * abs(ref_total), (sigma, total.item(), ref_total.item())
    # per position: float32 rounding of each O(value) term
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_original_uniform_formula_breaks_in_float32_at_small_sigma():
    """The original `ratio = 1 - dim / (esigm1 + dim)` rounds to 0 in float32 at sigma = 1e-4 for a GPT-2-sized
    vocabulary (50257 + 1e-4 == 50257 in float32): NaN/inf or a grossly wrong loss. Ours stays accurate."""
    graph = Uniform(50257)
    score, x, x0 = random_case(graph, 16, seed=3)
    sig = torch.full((16,), 1e-4)
    ref = original_score_entropy_uniform(score, sig.double(), x, x0)
    naive = original_score_entropy_uniform(score, sig, x, x0, dtype=torch.float32, original_ratio=True)
    naive_err = ((naive.double() - ref).abs() / ref.abs()).nan_to_num(nan=math.inf).max()
    assert not torch.all(torch.isfinite(naive)) or naive_err > 1e-2
    ours = graph.score_entropy(score, sig, x, x0)
    assert torch.all(torch.isfinite(ours))
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=0)


# -------------------------------------------------------------------------------------------- noise
def test_get_noise():
    assert isinstance(noise_lib.get_noise({"noise": {"type": "loglinear"}}), noise_lib.LogLinearNoise)
    geo = noise_lib.get_noise({"noise": {"type": "geometric", "sigma_min": 1e-4, "sigma_max": 20}})
    assert isinstance(geo, noise_lib.GeometricNoise) and (geo.sigma_min, geo.sigma_max) == (1e-4, 20.0)
    with pytest.raises(ValueError, match="noise.type"):
        noise_lib.get_noise({"noise": {"type": "cosine"}})


def test_loglinear_closed_form_and_rate_is_derivative():
    eps = 1e-3
    noise = noise_lib.LogLinearNoise(eps)
    t = torch.tensor([0.0, 1e-3, 0.1, 0.5, 0.9, 0.999, 1.0], dtype=torch.float64, requires_grad=True)
    total, rate = noise(t)
    tt = t.detach()
    torch.testing.assert_close(total.detach(), -torch.log(1 - (1 - eps) * tt))
    torch.testing.assert_close(rate.detach(), (1 - eps) / (1 - (1 - eps) * tt))
    (grad,) = torch.autograd.grad(total.sum(), t)
    torch.testing.assert_close(rate.detach(), grad)
    # the absorbing mask probability 1 - e^{-total} is (1 - eps) t
    torch.testing.assert_close(-torch.expm1(-total.detach()), (1 - eps) * tt)
    assert total[0] == 0 and math.isclose(total[-1].item(), -math.log(eps))


def test_geometric_closed_form_and_rate_is_derivative():
    smin, smax = 1e-4, 20.0
    noise = noise_lib.GeometricNoise(smin, smax)
    t = torch.linspace(0, 1, 11, dtype=torch.float64, requires_grad=True)
    total, rate = noise(t)
    tt = t.detach()
    torch.testing.assert_close(total.detach(), smin ** (1 - tt) * smax**tt)
    torch.testing.assert_close(rate.detach(), total.detach() * math.log(smax / smin))
    (grad,) = torch.autograd.grad(total.sum(), t)
    torch.testing.assert_close(rate.detach(), grad)
    assert math.isclose(total[0].item(), smin) and math.isclose(total[-1].item(), smax)
