"""The DWDSE loss: masks, the absorbing fast path, padding invariance and parity with the original formula."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import graph_lib
import noise_lib
from losses import (
    LOSS_KERNELS,
    LossTerms,
    _FusedAbsorbingEntropy,
    absorbing_entropy_from_logits,
    default_loss_kernel,
    perturb,
    sample_t,
    score_entropy_loss,
)
from tests.reference_sedd import (
    original_score_entropy_absorb,
    original_score_entropy_uniform,
    reference_forward,
)


def setup(config):
    return graph_lib.get_graph(config), noise_lib.get_noise(config)


def data(batch: int, seq_len: int, tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, tokens, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def padding_mask(lengths: list[int], seq_len: int) -> torch.Tensor:
    return (torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]).long()


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def uniform_config(config: dict) -> dict:
    """`config` switched (in place) to the uniform graph, which needs scale_by_sigma=False."""
    config["graph"]["type"] = "uniform"
    config["model"]["scale_by_sigma"] = False
    return config


def test_sample_t_range():
    torch.manual_seed(0)
    t = sample_t(10_000, torch.device("cpu"), eps=1e-3)
    assert t.shape == (10_000,) and t.min() >= 1e-3 and t.max() <= 1.0
    assert abs(t.mean().item() - 0.5005) < 0.01


def test_loss_mask_positions_never_perturbed_and_contribute_zero(tiny_model, tiny_config, make_model):
    uniform_model = make_model(uniform_config(copy.deepcopy(tiny_config)), seed=1)
    for model in (tiny_model, uniform_model):
        graph, noise = setup(model.config)
        x0 = data(4, 16, 50)
        loss_mask = torch.ones_like(x0)
        loss_mask[:, :6] = 0  # a "prompt"
        loss_mask[1, 10:] = 0
        perturbed_any = torch.zeros_like(x0, dtype=torch.bool)
        torch.manual_seed(0)
        for _ in range(25):
            t = torch.full((4,), 0.99)  # nearly everything on the loss mask is perturbed
            with torch.no_grad():
                terms = score_entropy_loss(model, x0, graph, noise, loss_mask=loss_mask, t=t)
            off = ~loss_mask.bool()
            assert torch.equal(terms.xt[off], x0[off])
            assert torch.all(terms.per_token[off] == 0)
            assert torch.equal(terms.n_scored, loss_mask.sum(-1))
            perturbed_any |= terms.xt != x0
        assert perturbed_any[loss_mask.bool()].float().mean() > 0.9  # the draws did perturb the scored tokens
    # perturb() itself
    absorb = graph_lib.Absorbing(50)
    xt = perturb(absorb, x0, torch.full((4,), 50.0), loss_mask)
    assert torch.equal(xt[~loss_mask.bool()], x0[~loss_mask.bool()]) and torch.all(xt[loss_mask.bool()] == 50)


def full_absorbing_loss(model, x0, xt, t, graph, noise, attention_mask=None, loss_mask=None):
    """The loss without the output_mask fast path: full output, then graph.score_entropy everywhere."""
    sigma, dsigma = noise(t)
    log_score = model(xt, sigma, attention_mask)
    entropy = graph.score_entropy(log_score, sigma[:, None], xt, x0)
    scored = torch.ones_like(x0, dtype=torch.bool)
    for m in (attention_mask, loss_mask):
        if m is not None:
            scored = scored & m.bool()
    return torch.where(scored, dsigma[:, None] * entropy, torch.zeros_like(entropy))


@pytest.mark.parametrize("kernel", LOSS_KERNELS)
def test_absorbing_fast_path_equals_full_computation(tiny_model, kernel):
    """The masked-rows output layer and loss (each loss kernel) equal the full-vocabulary computation at every
    position: per-token losses and every gradient."""
    graph, noise = setup(tiny_model.config)
    tiny_model.train()  # dropout is 0: train mode changes nothing but exercises the training path
    x0 = data(3, 16, 50, seed=1)
    attention_mask = padding_mask([16, 12, 7], 16)
    loss_mask = attention_mask.clone()
    loss_mask[:, :3] = 0
    t = torch.tensor([0.3, 0.6, 0.9])
    torch.manual_seed(1)
    xt = perturb(graph, x0, noise(t)[0], loss_mask.bool() & attention_mask.bool())
    assert (xt == graph.mask_index).sum() >= 10
    # masks given off the loss mask (a pre-masked prompt token) and in the padding are never scored
    xt[:, 0] = graph.mask_index
    xt[2, 10:] = graph.mask_index

    tiny_model.zero_grad()
    terms = score_entropy_loss(
        tiny_model,
        x0,
        graph,
        noise,
        loss_mask=loss_mask,
        attention_mask=attention_mask,
        t=t,
        xt=xt,
        loss_kernel=kernel,
    )
    terms.mean_per_token().backward()
    fast = grads(tiny_model)

    tiny_model.zero_grad()
    per_token = full_absorbing_loss(tiny_model, x0, xt, t, graph, noise, attention_mask, loss_mask)
    (per_token.sum() / terms.n_scored.sum()).backward()
    full = grads(tiny_model)

    torch.testing.assert_close(terms.per_token, per_token.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(terms.per_sequence, per_token.detach().sum(-1), rtol=1e-6, atol=1e-6)
    assert fast.keys() == full.keys() and len(fast) == len(list(tiny_model.parameters()))
    for name in fast:
        # float32 summation order differs between the two paths; atol scales with the gradient's magnitude
        atol = 1e-6 * full[name].abs().max().item()
        torch.testing.assert_close(fast[name], full[name], rtol=1e-5, atol=atol, msg=name)
    assert torch.all(terms.per_token[xt != graph.mask_index] == 0)
    assert torch.all(terms.per_token[:, 0] == 0) and torch.all(terms.per_token[2, 10:] == 0)


def test_uniform_graph_loss(tiny_config, make_model):
    model = make_model(uniform_config(tiny_config), seed=2)
    graph, noise = setup(model.config)
    assert isinstance(graph, graph_lib.Uniform) and model.vocab_size == 50
    x0 = data(3, 16, 50, seed=2)
    attention_mask = padding_mask([16, 10, 4], 16)
    torch.manual_seed(0)
    terms = score_entropy_loss(model, x0, graph, noise, attention_mask=attention_mask)
    loss = terms.mean_per_token()
    assert torch.isfinite(loss) and loss > 0
    assert torch.all(terms.per_token[~attention_mask.bool()] == 0)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.output_layer.linear.weight.grad.abs().sum() > 0


def test_loss_terms_mean_per_token(tiny_model):
    graph, noise = setup(tiny_model.config)
    x0 = data(3, 12, 50, seed=3)
    attention_mask = padding_mask([12, 8, 5], 12)
    torch.manual_seed(0)
    with torch.no_grad():
        terms = score_entropy_loss(tiny_model, x0, graph, noise, attention_mask=attention_mask)
    assert isinstance(terms, LossTerms)
    assert terms.per_token.shape == (3, 12) and terms.per_sequence.shape == (3,) and terms.t.shape == (3,)
    assert torch.equal(terms.n_scored, torch.tensor([12, 8, 5]))
    torch.testing.assert_close(terms.per_sequence, terms.per_token.sum(-1))
    torch.testing.assert_close(terms.mean_per_token(), terms.per_sequence.sum() / 25)
    assert torch.all(terms.per_token >= 0)
    empty = LossTerms(
        torch.zeros(1, 2), torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.ones(1), x0[:1, :2]
    )
    assert empty.mean_per_token() == 0  # no scored tokens: no division by zero


def test_padding_changes_neither_loss_nor_gradients(tiny_model):
    graph, noise = setup(tiny_model.config)
    x0 = data(3, 12, 50, seed=4)
    attention_mask = padding_mask([12, 9, 5], 12)
    real = attention_mask.bool()
    t = torch.tensor([0.4, 0.7, 0.95])
    torch.manual_seed(4)
    xt = perturb(graph, x0, noise(t)[0], real)

    def run(x0_, xt_, mask_):
        tiny_model.zero_grad()
        terms = score_entropy_loss(tiny_model, x0_, graph, noise, attention_mask=mask_, t=t, xt=xt_)
        terms.mean_per_token().backward()
        return terms, grads(tiny_model)

    base, base_grads = run(x0, xt, attention_mask)
    assert base.mean_per_token() > 0

    # other ids at the padded positions (in both x0 and xt)
    gen = torch.Generator().manual_seed(5)
    junk = torch.randint(0, 51, x0.shape, generator=gen)
    junk[:, ::2] = graph.mask_index  # the mask id in the padding must not be scored either
    changed, changed_grads = run(
        torch.where(real, x0, junk % 50), torch.where(real, xt, junk), attention_mask
    )
    # more padding appended on the right
    pad = torch.randint(0, 50, (3, 6), generator=gen)
    longer, longer_grads = run(
        torch.cat([x0, pad], 1),
        torch.cat([xt, pad], 1),
        torch.cat([attention_mask, torch.zeros(3, 6).long()], 1),
    )

    for other, other_grads in ((changed, changed_grads), (longer, longer_grads)):
        torch.testing.assert_close(other.per_sequence, base.per_sequence, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other.mean_per_token(), base.mean_per_token(), rtol=1e-5, atol=1e-6)
        assert torch.equal(other.n_scored, base.n_scored)
        for name, grad in base_grads.items():
            torch.testing.assert_close(other_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_loss_matches_original_formula_on_reference_model(tiny_model, tiny_config, make_model):
    """per_sequence == sum_l dsigma * original_score_entropy(reference_model(xt)) in float64, both graphs."""
    uniform_model = make_model(uniform_config(copy.deepcopy(tiny_config)), seed=6)
    for model in (tiny_model, uniform_model):
        graph, noise = setup(model.config)
        x0 = data(4, 16, 50, seed=6)
        t = torch.tensor([0.05, 0.3, 0.7, 0.98])
        torch.manual_seed(6)
        sigma, dsigma = noise(t)
        xt = perturb(graph, x0, sigma, None)
        with torch.no_grad():
            terms = score_entropy_loss(model, x0, graph, noise, t=t, xt=xt)
        ref_out = reference_forward(model.state_dict(), model.config, xt, sigma.double())
        if graph.absorb:
            entropy = original_score_entropy_absorb(ref_out, sigma.double()[:, None], xt, x0)
        else:
            entropy = original_score_entropy_uniform(ref_out, sigma.double()[:, None], xt, x0)
        expected = (dsigma.double()[:, None] * entropy).sum(-1)
        assert (expected > 0).sum() >= 3
        torch.testing.assert_close(terms.per_sequence.double(), expected, rtol=1e-5, atol=0)


def test_absorbing_batch_without_masked_tokens(tiny_model):
    """Small t can leave nothing masked: the loss is 0 and backward still works (zero gradients)."""
    graph, noise = setup(tiny_model.config)
    x0 = data(2, 8, 50, seed=7)
    terms = score_entropy_loss(tiny_model, x0, graph, noise, t=torch.tensor([0.01, 0.02]), xt=x0.clone())
    loss = terms.mean_per_token()
    assert loss == 0 and loss.requires_grad
    loss.backward()
    assert all(torch.all(p.grad == 0) for p in tiny_model.parameters() if p.grad is not None)


@pytest.mark.parametrize("kernel", LOSS_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale_by_sigma", [True, False])
def test_fused_absorbing_entropy_equals_plain_formula_with_gradients(dtype, scale_by_sigma, kernel):
    """`absorbing_entropy_from_logits` (each kernel: one buffer, or the fused passes run eagerly on CPU; both
    with hand-written backwards) against `Absorbing.score_entropy` on the log-scores the model's head would
    produce (logits - shift, input entry 0), autograd through the plain formula for the reference gradient.
    Sigmas from 1e-4 (esigm1 ~ 1e-4) to 8; float64 checks are tight."""
    graph = graph_lib.Absorbing(40)
    gen = torch.Generator().manual_seed(11)
    n = 24
    sigma = torch.logspace(-4, math.log10(8.0), n, dtype=dtype)
    logits = (2 * torch.randn(n, graph.dim, generator=gen, dtype=dtype)).requires_grad_()
    x0 = torch.randint(0, graph.dim - 1, (n,), generator=gen)
    weights = torch.rand(n, generator=gen, dtype=dtype)  # a generic upstream gradient

    fused = absorbing_entropy_from_logits(logits, x0, sigma, scale_by_sigma, kernel)
    (fused_grad,) = torch.autograd.grad((weights * fused).sum(), logits)

    shift = (
        torch.log(torch.expm1(sigma)) + math.log(graph.dim - 1) if scale_by_sigma else torch.zeros_like(sigma)
    )
    log_score = (logits - shift[:, None]).scatter(-1, torch.full((n, 1), graph.mask_index), 0.0)
    xt = torch.full((n,), graph.mask_index)
    plain = graph.score_entropy(log_score, sigma, xt, x0)
    (plain_grad,) = torch.autograd.grad((weights * plain).sum(), logits)

    assert fused.dtype == torch.float32 or dtype == torch.float64
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(fused.to(dtype), plain, rtol=rtol, atol=0)
    torch.testing.assert_close(fused_grad, plain_grad, rtol=rtol, atol=rtol * plain_grad.abs().max().item())
    assert torch.all(fused_grad[:, -1] == 0)  # the mask state's logit does not enter the loss


@pytest.mark.parametrize("kernel", LOSS_KERNELS)
def test_fused_absorbing_entropy_gradient_matches_finite_differences(kernel):
    """Each kernel's hand-written backward against central differences in float64 along random directions
    (v^T J u). A second backward through the same graph is refused by the one-buffer kernel (its buffer became
    the gradient), not wrong; the fused kernel keeps the logits, so it gives the same gradient again."""
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    x0 = torch.tensor([0, 3, 7, 2, 5])
    sigma = torch.tensor([1e-3, 0.1, 0.7, 2.0, 6.0], dtype=torch.float64)

    def entropy(z):
        return absorbing_entropy_from_logits(z, x0, sigma, True, kernel)

    for _ in range(4):
        u = torch.randn(logits.shape, generator=gen, dtype=torch.float64)
        v = torch.randn(5, generator=gen, dtype=torch.float64)
        z = logits.clone().requires_grad_()
        (grad,) = torch.autograd.grad((v * entropy(z)).sum(), z)
        h = 1e-6
        finite = (v * (entropy(logits + h * u) - entropy(logits - h * u))).sum() / (2 * h)
        torch.testing.assert_close((grad * u).sum(), finite, rtol=1e-7, atol=1e-9)
    z = logits.clone().requires_grad_()
    out = entropy(z).sum()
    out.backward(retain_graph=True)
    if kernel == "one_buffer":
        with pytest.raises(RuntimeError, match="one backward pass"):
            out.backward()
    else:
        first = z.grad.clone()
        out.backward()
        torch.testing.assert_close(z.grad, 2 * first, rtol=1e-12, atol=0)


def test_loss_kernel_is_chosen_by_device_and_checked():
    """CPU gets the one-buffer kernel (the fused one is compiled on CUDA only); an unknown name is refused
    with the valid ones."""
    assert default_loss_kernel(torch.device("cpu")) == "one_buffer"
    with pytest.raises(ValueError, match="one_buffer"):
        absorbing_entropy_from_logits(
            torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), torch.ones(2), True, "x"
        )


def test_fused_kernel_compiles_and_matches_eager():
    """The fused kernel's two passes go through torch.compile (as on CUDA; here inductor's CPU backend) and give
    the eager passes' entropies and gradients, at two row counts (dynamic shapes)."""
    gen = torch.Generator().manual_seed(14)
    for n in (37, 53):
        logits = (2 * torch.randn(n, 101, generator=gen)).requires_grad_()
        x0 = torch.randint(0, 100, (n,), generator=gen)
        log_esigm1 = torch.expm1(torch.rand(n, generator=gen) + 0.01).log()
        shift = log_esigm1 + math.log(100)
        upstream = torch.rand(n, generator=gen)
        results = []
        for compiled in (True, False):
            entropy = _FusedAbsorbingEntropy.apply(logits, x0, shift, log_esigm1, compiled)
            (grad,) = torch.autograd.grad(entropy, logits, upstream)
            results.append((entropy, grad))
        (compiled_entropy, compiled_grad), (eager_entropy, eager_grad) = results
        torch.testing.assert_close(compiled_entropy, eager_entropy, rtol=1e-5, atol=0)
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-7)
