"""The likelihood estimators of rl/estimators.py: the ELBO against the score-entropy loss, common random numbers,
the mean-field estimate as a proper log-probability, and both against a toy distribution known exactly."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

import graph_lib
import noise_lib
from losses import score_entropy_loss
from rl.buffer import collate, make_example
from rl.estimators import elbo_log_prob, mc_draws, mean_field_log_prob, normalized_elbo_log_prob
from tests.rl_toy import TRUE_P, toy_batch, toy_parts, toy_scorer, trained_toy
from tests.tiny_models import one_thread  # noqa: F401  (autouse fixture)
from training import example_noise, perturb_from_draws


def padded_batch(lengths=((3, 4), (5, 2), (2, 6))) -> dict[str, torch.Tensor]:
    """Prompts and completions of different lengths (right padding), random tokens of a 50-token vocabulary."""
    gen = torch.Generator().manual_seed(0)
    examples = [
        make_example(
            torch.randint(0, 49, (p,), generator=gen), torch.randint(0, 49, (c,), generator=gen), True, 49
        )
        for p, c in lengths
    ]
    return collate(examples, 49, None)


def test_elbo_is_minus_the_mean_score_entropy_loss_over_its_draws(tiny_model):
    graph, noise = graph_lib.get_graph(tiny_model.config), noise_lib.get_noise(tiny_model.config)
    batch, ids, n_mc = padded_batch(), [7, 8, 9], 3
    length = batch["input_ids"].shape[1]
    estimate = elbo_log_prob(tiny_model, graph, noise, batch, mc_draws(ids, length, 5, n_mc, "cpu"), n_mc)
    scored = batch["loss_mask"].bool() & batch["attention_mask"].bool()
    total = torch.zeros(3)
    for k in range(n_mc):
        t, xt = perturb_from_draws(
            graph, noise, batch["input_ids"], scored, example_noise(ids, length, 5, k, "cpu"), 1e-3
        )
        total += score_entropy_loss(
            tiny_model, batch["input_ids"], graph, noise, loss_mask=scored, attention_mask=batch["attention_mask"],
            t=t, xt=xt,
        ).per_sequence  # fmt: skip
    torch.testing.assert_close(estimate, -total / n_mc)
    assert bool((estimate < 0).all())


class ExactMass(torch.nn.Module):
    """A SEDD whose score at every masked position has the exact total mass: its log-scores are the log-softmax
    of the inner model's over the vocabulary, shifted so that (e^sigma - 1) sum_y s_y = 1."""

    scale_by_sigma = True

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, xt, sigma, attention_mask=None, output_mask=None, raw=False):
        logits = self.inner(xt, sigma, attention_mask, output_mask=output_mask, raw=True)
        real = torch.log_softmax(logits[..., :-1], dim=-1) + math.log(logits.shape[-1] - 1)
        return torch.cat([real, logits[..., -1:]], dim=-1)


def test_the_normalised_elbo_drops_the_score_mass_term(tiny_model):
    """l_norm - mass = l on the same draws (so l_norm >= l), and mass = 0 for a model whose score mass is
    exact."""
    graph, noise = graph_lib.get_graph(tiny_model.config), noise_lib.get_noise(tiny_model.config)
    batch, n_mc = padded_batch(), 4
    draws = mc_draws([1, 2, 3], batch["input_ids"].shape[1], 0, n_mc, "cpu")
    with torch.no_grad():
        plain = elbo_log_prob(tiny_model, graph, noise, batch, draws, n_mc)
        normalized, mass = normalized_elbo_log_prob(tiny_model, graph, noise, batch, draws, n_mc)
        assert bool((normalized > plain + 1e-3).all()) and bool((normalized <= 0).all())
        torch.testing.assert_close(normalized - mass, plain)  # minus the ELBO = normalised part + mass term
        exact = ExactMass(tiny_model)
        e_plain = elbo_log_prob(exact, graph, noise, batch, draws, n_mc)
        e_normalized, e_mass = normalized_elbo_log_prob(exact, graph, noise, batch, draws, n_mc)
        torch.testing.assert_close(e_normalized, e_plain)
        assert float(e_mass.abs().max()) < 1e-4
        torch.testing.assert_close(e_plain, normalized)  # the normalised ELBO only sees the softmax


def test_common_random_numbers_cut_the_variance_of_an_elbo_difference(tiny_model):
    """One-draw ELBO differences between a model and a slightly perturbed copy: with the same (t, x_t) for both
    the variance is a small fraction of that with independent draws."""
    graph, noise = graph_lib.get_graph(tiny_model.config), noise_lib.get_noise(tiny_model.config)
    other = copy.deepcopy(tiny_model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.02 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    n = 256  # one draw each: the sequence repeated with ids 0..n-1
    batch = {k: v[:1].repeat(n, 1) for k, v in padded_batch().items() if k != "prompt_len"}
    length = batch["input_ids"].shape[1]
    with torch.no_grad():
        a = elbo_log_prob(tiny_model, graph, noise, batch, mc_draws(range(n), length, 0, 1, "cpu"), 1)
        b_same = elbo_log_prob(other, graph, noise, batch, mc_draws(range(n), length, 0, 1, "cpu"), 1)
        b_indep = elbo_log_prob(other, graph, noise, batch, mc_draws(range(n), length, 1, 1, "cpu"), 1)
    crn, independent = (a - b_same).var(), (a - b_indep).var()
    assert float(crn) < 0.01 * float(independent), (float(crn), float(independent))


def test_identical_models_give_a_zero_difference_under_the_scorer(tiny_model):
    scorer = toy_scorer(tiny_model, n_mc=2, eos_id=49)
    examples = [make_example([1, 2], [3, 4, 5], True, 49), make_example([6], [7, 8], True, 49)]
    diff = scorer.score(copy.deepcopy(tiny_model), examples, [0, 1]) - scorer.score(
        tiny_model, examples, [0, 1]
    )
    assert diff.abs().max() == 0
    again = scorer.score(tiny_model, examples, [0, 2])  # another id: other draws for the second example
    assert float(again[1]) != float(scorer.score(tiny_model, examples, [0, 1])[1])


@pytest.mark.parametrize("mask_prompt", [0.0, 0.5])
def test_mean_field_is_a_proper_log_probability(mask_prompt):
    torch.manual_seed(0)
    from model import SEDD
    from tests.conftest import randomize_
    from tests.rl_toy import TOY_CONFIG

    model = randomize_(SEDD(TOY_CONFIG)).eval()
    graph, noise = toy_parts(model)
    completions = list(itertools.product(range(5), repeat=2))  # every two-token completion
    batch = toy_batch(completions)
    batch["input_ids"][:, 0] = 3  # a prompt token the 0.5 prompt mask hides or not, the same for every row
    draws = mc_draws([11] * len(completions), 3, 0, 1, "cpu")
    with torch.no_grad():
        log_p = mean_field_log_prob(model, graph, noise, batch, draws, mask_prompt)
    assert bool((log_p <= 0).all())
    torch.testing.assert_close(torch.logsumexp(log_p, 0), torch.tensor(0.0), atol=1e-5, rtol=0)


def test_mean_field_needs_an_absorbing_graph(tiny_config, make_model):
    uniform = {"graph": {"type": "uniform"}, "model": {**tiny_config["model"], "scale_by_sigma": False}}
    model = make_model({**tiny_config, **uniform})
    graph, noise = graph_lib.get_graph(model.config), noise_lib.get_noise(model.config)
    with pytest.raises(ValueError, match="estimator=elbo"):
        mean_field_log_prob(model, graph, noise, padded_batch())


def test_estimators_on_a_distribution_known_exactly():
    toy_model = trained_toy()
    completions = sorted(TRUE_P, key=TRUE_P.get, reverse=True)
    nll = torch.tensor([-math.log(TRUE_P[c]) for c in completions])
    batch = toy_batch(completions)
    graph, noise = toy_parts(toy_model)
    n_mc = 512
    with torch.no_grad():
        draws = mc_draws(range(4), 3, 0, n_mc, "cpu")
        elbo = elbo_log_prob(toy_model, graph, noise, batch, draws, n_mc)
        normalized = normalized_elbo_log_prob(toy_model, graph, noise, batch, draws, n_mc)[0]
        mean_field = mean_field_log_prob(toy_model, graph, noise, batch)
    # the ELBO bounds the model's log-likelihood, so its expectation under the data is a cross-entropy: at least
    # the entropy H(p) (up to the Monte-Carlo error), and near it for a model fitted to p
    probs = torch.tensor([TRUE_P[c] for c in completions])
    entropy = float((probs * nll).sum())
    cross_entropy = float((probs * -elbo).sum())
    assert entropy - 0.05 <= cross_entropy <= entropy + 0.25, (cross_entropy, entropy)
    # each likely completion's -ELBO is near its true negative log-probability
    assert (-elbo[:2] - nll[:2]).abs().max() < 0.25, (-elbo, nll)
    # the normalised ELBO is above the plain one (by the score-mass term) and also near the truth
    assert bool((normalized >= elbo).all()) and (-normalized[:2] - nll[:2]).abs().max() < 0.25, (
        -normalized,
        nll,
    )
    # all rank the completions in the true order, and a completion outside the support far below them
    for estimate in (elbo, normalized, mean_field):
        assert bool((estimate[:-1] > estimate[1:]).all()), estimate
    outside = toy_batch([(1, 1)])
    with torch.no_grad():
        assert (
            float(elbo_log_prob(toy_model, graph, noise, outside, mc_draws([9], 3, 0, 64, "cpu"), 64))
            < float(elbo[-1]) - 1
        )
    # the mean-field bias: it ignores that y2 is determined by y1, counting the evidence twice
    assert bool((-mean_field > nll + 0.3).all()), (-mean_field, nll)
