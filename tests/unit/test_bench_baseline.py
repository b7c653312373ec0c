"""The benchmark's baseline (benchmarks/original_sedd.py) computes what this project computes: same network
output, same loss, same EMA, valid samples. Speed is measured only in benchmarks/bench.py, never here."""

from __future__ import annotations

import torch

import graph_lib
import noise_lib
from benchmarks.original_sedd import LoopEMA, OriginalSEDD, OriginalTrainer, original_loss, original_sample
from losses import perturb, score_entropy_loss
from model.ema import ExponentialMovingAverage


def original_like(model: torch.nn.Module) -> OriginalSEDD:
    original = OriginalSEDD(model.config)
    missing, unexpected = original.load_state_dict(model.state_dict(), strict=False)
    assert not missing and not unexpected
    return original.eval()


def test_original_network_equals_ours(tiny_model):
    original = original_like(tiny_model)
    gen = torch.Generator().manual_seed(0)
    indices = torch.randint(0, tiny_model.vocab_size, (3, 16), generator=gen)
    sigma = torch.tensor([0.01, 0.4, 3.0])
    with torch.no_grad():
        torch.testing.assert_close(original(indices, sigma), tiny_model(indices, sigma), rtol=1e-5, atol=1e-5)


def test_original_loss_and_gradients_equal_ours(tiny_model):
    original = original_like(tiny_model)
    graph, noise = graph_lib.get_graph(tiny_model.config), noise_lib.get_noise(tiny_model.config)
    x0 = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    torch.manual_seed(1)
    xt = perturb(graph, x0, noise(t)[0], None)

    ours = score_entropy_loss(tiny_model, x0, graph, noise, t=t, xt=xt).per_sequence
    theirs = original_loss(original, x0, t, xt)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    ours.sum().backward()
    theirs.sum().backward()
    for (name, p), q in zip(tiny_model.named_parameters(), original.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max().item(), msg=name)


def test_original_trainer_step_and_loop_ema(tiny_model):
    original = original_like(tiny_model).train()
    before = [p.detach().clone() for p in original.parameters()]
    trainer = OriginalTrainer(original, warmup=1)
    ema = ExponentialMovingAverage([p.detach().clone().requires_grad_() for p in before], decay=0.9)
    loss = trainer.train_step(torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(2)))
    assert torch.isfinite(loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, original.parameters(), strict=True))
    # the loop EMA and ours agree after an update
    loop = LoopEMA([p.detach().clone().requires_grad_() for p in before], decay=0.9)
    loop.update(original.parameters())
    ema.update(original.parameters())
    for a, b in zip(loop.shadow_params, ema.shadow_params, strict=True):
        torch.testing.assert_close(a, b)


def test_original_sampler_returns_real_tokens(tiny_model):
    original = original_like(tiny_model)
    torch.manual_seed(3)
    x = original_sample(original, batch=2, length=10, steps=4)
    assert x.shape == (2, 10) and x.dtype == torch.long
    assert bool(((x >= 0) & (x < tiny_model.vocab_size - 1)).all())  # never the mask state


def test_bench_sft_batches_are_padded_and_prompt_masked():
    """bench.py --sft-batches: row lengths in [L/2, L], padding neither attended to nor scored, the first
    quarter of each row a prompt (attended, not scored)."""
    from benchmarks.bench import sft_batch

    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 100, (64, 40), generator=gen)
    batch = sft_batch(x0, gen)
    lengths = batch["attention_mask"].sum(1)
    assert torch.equal(batch["input_ids"], x0)
    assert int(lengths.min()) >= 20 and int(lengths.max()) <= 40 and len(set(lengths.tolist())) > 5
    scored = batch["loss_mask"].bool()
    assert not (scored & ~batch["attention_mask"].bool()).any()
    assert torch.equal(scored.sum(1), lengths - lengths // 4)
    assert not scored[:, : int(lengths.min()) // 4].any()
