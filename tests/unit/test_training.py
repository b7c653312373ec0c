"""The training step: the update does not depend on how the global batch is split (accumulation, DDP),
padding does not matter, prompt tokens are never noised, non-finite losses skip the update."""

from __future__ import annotations

import math

import pytest
import torch

import graph_lib
import noise_lib
import utils
from data import sft_collate
from model import SEDD
from model.ema import ExponentialMovingAverage
from tests.conftest import randomize_
from training import (
    TrainState,
    batch_loss,
    example_noise,
    lr_lambda,
    perturb_from_draws,
    train_step,
)

EXAMPLES = [
    {"input_ids": [5, 6, 7, 8, 9, 10, 11], "prompt_len": 3},
    {"input_ids": [12, 13, 14, 15, 16], "prompt_len": 2},
    {"input_ids": [17, 18, 19, 20, 21, 22, 23, 24, 25], "prompt_len": 4},
    {"input_ids": [26, 27, 28, 29], "prompt_len": 1},
]


def make_state(tiny_config, lr=1.0):
    model = randomize_(SEDD(tiny_config), seed=1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return TrainState(model, optimizer, scheduler, ExponentialMovingAverage(params, 0.9))


def micro_batches(indices_groups, pad_to=None, seed=0, step=0):
    batches = []
    for group in indices_groups:
        batch = sft_collate([EXAMPLES[i] for i in group], pad_id=0, pad_to=pad_to)
        batch["draws"] = example_noise(group, batch["input_ids"].shape[1], seed, step, torch.device("cpu"))
        batches.append(batch)
    return batches


def run_step(state, groups, **kwargs):
    graph = graph_lib.get_graph(state.model.config)
    noise = noise_lib.get_noise(state.model.config)

    def loss_fn(model, mb):
        return batch_loss(model, mb, graph, noise, mb["draws"])

    return train_step(
        state,
        state.model,
        micro_batches(groups, **kwargs),
        loss_fn,
        precision="fp32",
        device=torch.device("cpu"),
        grad_clip=0,
    )


def test_accumulation_1x4_equals_4x1(tiny_config):
    one, four = make_state(tiny_config), make_state(tiny_config)
    r1 = run_step(one, [[0, 1, 2, 3]])
    r4 = run_step(four, [[0], [1], [2], [3]])
    assert r1.n_scored == r4.n_scored == sum(len(e["input_ids"]) - e["prompt_len"] for e in EXAMPLES)
    assert r1.loss == pytest.approx(r4.loss, rel=1e-6)
    for a, b in zip(one.model.parameters(), four.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and the step really moved the weights
    fresh = make_state(tiny_config)
    assert not torch.equal(fresh.model.blocks[0].attn_qkv.weight, one.model.blocks[0].attn_qkv.weight)


def test_padding_changes_neither_loss_nor_update(tiny_config):
    tight, padded = make_state(tiny_config), make_state(tiny_config)
    r1 = run_step(tight, [[0, 1, 2, 3]])
    r2 = run_step(padded, [[0, 1, 2, 3]], pad_to=16)
    assert r1.loss == pytest.approx(r2.loss, rel=1e-6)
    for a, b in zip(tight.model.parameters(), padded.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_prompt_tokens_are_never_noised(tiny_config):
    graph = graph_lib.get_graph(tiny_config)
    noise = noise_lib.get_noise(tiny_config)
    batch = micro_batches([[0, 1, 2, 3]])[0]
    scored = batch["loss_mask"].bool()
    for step in range(50):
        draws = example_noise(range(4), batch["input_ids"].shape[1], 0, step, torch.device("cpu"))
        if step == 0:
            draws.u_t.fill_(1.0 - 1e-6)  # t = 1: every scored token is masked
        _, xt = perturb_from_draws(graph, noise, batch["input_ids"], scored, draws, 1e-3)
        assert torch.equal(xt[~scored], batch["input_ids"][~scored])
        if step == 0:
            assert (xt[scored] == graph.dim - 1).all()


def test_draws_do_not_depend_on_batch_layout():
    a = example_noise([3, 1], 6, seed=7, step=2, device=torch.device("cpu"))
    b = example_noise([1], 6, seed=7, step=2, device=torch.device("cpu"))
    torch.testing.assert_close(a.u_move[1], b.u_move[0])
    c = example_noise([1], 6, seed=7, step=3, device=torch.device("cpu"))
    assert not torch.equal(b.u_move, c.u_move)


def test_nonfinite_loss_skips_the_update(tiny_config):
    state = make_state(tiny_config)
    before = [p.detach().clone() for p in state.model.parameters()]
    with torch.no_grad():
        state.model.output_layer.linear.bias[0] = math.inf
    before[[n for n, _ in state.model.named_parameters()].index("output_layer.linear.bias")][0] = math.inf
    result = run_step(state, [[0, 1, 2, 3]])
    assert result.skipped and state.step == 0 and state.nonfinite_in_row == 1
    for a, b in zip(before, state.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_warmup_then_constant_or_cosine():
    constant = lr_lambda(warmup=4, n_iters=10)
    assert [constant(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cosine = lr_lambda(warmup=0, n_iters=10, schedule="cosine", min_lr_ratio=0.1)
    assert cosine(9) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="optim.schedule"):
        lr_lambda(1, 2, schedule="linear")


def _ddp_worker(tiny_config, out_path):
    from torch.nn.parallel import DistributedDataParallel

    state = make_state(tiny_config)
    rank = utils.get_rank()
    groups = [[0, 1]] if rank == 0 else [[2, 3]]
    graph = graph_lib.get_graph(state.model.config)
    noise = noise_lib.get_noise(state.model.config)
    ddp = DistributedDataParallel(state.model)
    train_step(
        state,
        ddp,
        micro_batches(groups),
        lambda model, mb: batch_loss(model, mb, graph, noise, mb["draws"]),
        precision="fp32",
        device=torch.device("cpu"),
        grad_clip=0,
    )
    if rank == 0:
        torch.save(state.model.state_dict(), out_path)


def _spawned(tiny_config, out_path):
    info = utils.detect_launch()
    utils.init_distributed(info)
    try:
        _ddp_worker(tiny_config, out_path)
    finally:
        utils.cleanup_distributed()


def test_ddp_two_processes_equal_one_process(tiny_config, tmp_path):
    single = make_state(tiny_config)
    run_step(single, [[0, 1, 2, 3]])
    out = tmp_path / "ddp.pt"
    utils.spawn_local_workers(_spawned, 2, (tiny_config, str(out)))
    ddp_weights = torch.load(out)
    for name, p in single.model.state_dict().items():
        torch.testing.assert_close(ddp_weights[name], p, rtol=1e-5, atol=1e-6)
