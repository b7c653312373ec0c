"""The CUDA code paths: varlen flash attention, bf16 autocast training, the sampler and sft.py on a GPU.

Marked `gpu`, so deselected by default (CI has no GPU); on a GPU machine: `python -m pytest -m gpu tests/test_cuda.py`
(or `bash benchmarks/cuda_check.sh`, which also runs the GPU benchmark).
"""

from __future__ import annotations

import re

import pytest
import torch

import graph_lib
import losses
import noise_lib
import sampling
import training
from model import SEDD
from model import attention as attention_module
from model.attention import attention, sdpa_attention
from tests.conftest import randomize_

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


def lengths_mask(lengths: list[int], seq_len: int) -> torch.Tensor:
    return torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]


def test_varlen_kernel_equals_masked_attention_in_fp32():
    """The varlen kernel (flash-attn, else torch's varlen_attn) on packed bf16 tokens equals fp32 SDPA with a
    key mask at real positions, outputs and gradients, to bf16 accuracy; padding gets zero gradient."""
    gen = torch.Generator().manual_seed(0)
    batch, seq_len, heads, head_dim = 3, 200, 12, 64
    qkv = torch.randn(batch, seq_len, 3, heads, head_dim, generator=gen).to(CUDA)
    mask = lengths_mask([200, 131, 7], seq_len).to(CUDA)
    half = qkv.to(torch.bfloat16).requires_grad_()
    kernel = attention_module.varlen_kernel(half)
    assert kernel is not None, "no varlen kernel on CUDA: install flash-attn or use torch >= 2.10"
    out = attention(half, mask)
    reference_in = half.detach().float().requires_grad_()
    reference = sdpa_attention(reference_in, mask)
    real = mask.bool()
    torch.testing.assert_close(out.float()[real], reference[real], rtol=0.02, atol=0.02)
    upstream = torch.randn(out.shape, generator=gen).to(CUDA)
    out.backward(upstream.to(out.dtype))
    reference.backward(upstream * real[..., None, None])
    torch.testing.assert_close(half.grad.float()[real], reference_in.grad[real], rtol=0.05, atol=0.05)
    assert half.grad[~real].abs().max() == 0


def test_model_on_cuda_equals_cpu_in_fp32(tiny_config):
    """The same weights give the same log-scores on CUDA as on CPU (fp32, padded batch)."""
    model = randomize_(SEDD(tiny_config), 3).eval()
    gen = torch.Generator().manual_seed(1)
    indices = torch.randint(0, model.vocab_size, (3, 24), generator=gen)
    sigma = torch.tensor([0.1, 1.0, 3.0])
    mask = lengths_mask([24, 17, 5], 24)
    with torch.no_grad():
        cpu = model(indices, sigma, mask)
        cuda = model.to(CUDA)(indices.to(CUDA), sigma.to(CUDA), mask.to(CUDA)).cpu()
    torch.testing.assert_close(cuda[mask], cpu[mask], rtol=1e-4, atol=1e-4)


def test_output_row_padding_keeps_loss_and_gradients(tiny_config):
    """On CUDA the output layer's rows are padded to a multiple of 64 (51 -> 64 here): the score-entropy loss
    and every gradient equal those with the padding off (fp32)."""
    graph, noise = graph_lib.get_graph(tiny_config), noise_lib.get_noise(tiny_config)
    gen = torch.Generator().manual_seed(8)
    x0 = torch.randint(0, tiny_config["tokens"], (4, 32), generator=gen).to(CUDA)
    mask = lengths_mask([32, 30, 17, 9], 32).to(CUDA)
    t = torch.tensor([0.2, 0.5, 0.8, 0.95]).to(CUDA)
    xt = graph.sample_transition(x0, noise(t)[0][:, None])
    results = []
    for multiple in (64, 1):
        model = randomize_(SEDD(tiny_config), 9).to(CUDA)
        model.output_layer.cuda_row_multiple = multiple
        terms = losses.score_entropy_loss(model, x0, graph, noise, attention_mask=mask, t=t, xt=xt)
        terms.mean_per_token().backward()
        results.append((terms.per_token, [p.grad for p in model.parameters()]))
    (padded, padded_grads), (plain, plain_grads) = results
    assert int((xt == graph.dim - 1).sum()) > 10  # the output layer ran on masked rows
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-6)
    for got, want in zip(padded_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_fused_loss_kernel_equals_one_buffer_kernel(dtype):
    """The compiled "fused" score-entropy kernel (CUDA's default) against the eager one-buffer kernel on
    GPT-2-sized logits that are a view of a row-padded buffer (as the output layer returns them), at two row
    counts (dynamic shapes, no recompilation error): the same entropies and gradients (both compute in fp32;
    bf16 gradients may differ by rounding of the last bit)."""
    assert losses.default_loss_kernel(CUDA) == "fused"
    gen = torch.Generator().manual_seed(13)
    vocab = 50258
    for n in (300, 517):
        padded = (3 * torch.randn(n, 50304, generator=gen)).to(CUDA, dtype)
        x0 = torch.randint(0, vocab - 1, (n,), generator=gen).to(CUDA)
        sigma = torch.logspace(-3, 0.9, n).to(CUDA)
        upstream = torch.rand(n, generator=gen).to(CUDA)
        results = []
        for kernel in ("fused", "one_buffer"):
            logits = padded.clone().requires_grad_()
            entropy = losses.absorbing_entropy_from_logits(logits[:, :vocab], x0, sigma, True, kernel)
            entropy.backward(upstream)
            results.append((entropy, logits.grad))
        (fused, fused_grad), (plain, plain_grad) = results
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=0)
        rtol = 1e-5 if dtype == torch.float32 else 2**-7
        torch.testing.assert_close(fused_grad, plain_grad, rtol=rtol, atol=1e-30)
        assert fused_grad[:, vocab - 1 :].abs().max() == 0  # the mask state and the padded rows


def test_bf16_padded_forward_is_close_to_fp32(tiny_config):
    """bf16 autocast through the varlen path stays close to the fp32 SDPA path (relative error of the scores)."""
    model = randomize_(SEDD(tiny_config), 4).eval().to(CUDA)
    gen = torch.Generator().manual_seed(2)
    indices = torch.randint(0, model.vocab_size, (4, 64), generator=gen).to(CUDA)
    sigma = torch.tensor([0.05, 0.5, 1.5, 4.0]).to(CUDA)
    mask = lengths_mask([64, 40, 33, 2], 64).to(CUDA)
    with torch.no_grad():
        fp32 = model(indices, sigma, mask)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(indices, sigma, mask)
    assert bf16.dtype == torch.float32  # log-scores are returned in float32
    real = mask.bool()
    error = (bf16[real].exp() - fp32[real].exp()).abs().sum(-1) / fp32[real].exp().sum(-1)
    assert error.max() < 0.05, error.max()


def _train_losses(tiny_config: dict, precision: str, steps: int) -> list[float]:
    """Losses of `steps` train_step calls on one fixed, learnable padded batch (the same pattern in every row)."""
    from model.ema import ExponentialMovingAverage

    model = randomize_(SEDD(tiny_config), 5).to(CUDA).train()
    params = list(model.parameters())
    optimizer = training.build_optimizer(params, lr=3e-3)
    state = training.TrainState(
        model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        ema=ExponentialMovingAverage(params, decay=0.9),
    )
    graph, noise = graph_lib.get_graph(tiny_config), noise_lib.get_noise(tiny_config)
    gen = torch.Generator().manual_seed(3)
    x0 = (torch.arange(32) * 7 % tiny_config["tokens"]).repeat(8, 1)
    attention_mask = lengths_mask([32] * 4 + [20] * 4, 32).long()
    batch = training.to_device(
        {"input_ids": x0, "attention_mask": attention_mask, "loss_mask": torch.ones_like(x0)}, CUDA
    )
    losses = []
    for _ in range(steps):
        draws = training.NoiseDraws(
            *(torch.rand(s, generator=gen).to(CUDA) for s in ((8,), (8, 32), (8, 32)))
        )
        result = training.train_step(
            state,
            model,
            [batch],
            lambda fwd, mb, d=draws: training.batch_loss(fwd, mb, graph, noise, d),
            precision=precision,
            device=CUDA,
            grad_clip=1.0,
        )
        losses.append(float(result.loss))
    return losses


def test_bf16_training_step_learns_on_cuda(tiny_config):
    """train_step with precision=bf16 on CUDA (varlen attention, fused AdamW, EMA): the first loss equals the
    fp32 one to bf16 accuracy, and the losses fall on a learnable batch as fast as in fp32."""
    bf16, fp32 = _train_losses(tiny_config, "bf16", 80), _train_losses(tiny_config, "fp32", 80)
    assert all(torch.isfinite(torch.tensor(bf16)))
    assert abs(bf16[0] - fp32[0]) < 0.02 * fp32[0], (bf16[0], fp32[0])
    start, end = sum(bf16[:10]) / 10, sum(bf16[-10:]) / 10
    assert end < 0.5 * start, bf16
    assert end < 1.5 * sum(fp32[-10:]) / 10 + 0.05, (bf16[-10:], fp32[-10:])


def test_sampler_on_cuda_in_bf16_keeps_prompts(tiny_config):
    """The fast absorbing sampler runs on CUDA under bf16 autocast: prompt tokens kept, no mask token left."""
    model = randomize_(SEDD(tiny_config), 6).eval().to(CUDA)
    graph, noise = graph_lib.get_graph(tiny_config), noise_lib.get_noise(tiny_config)
    prompt = torch.randint(0, tiny_config["tokens"], (4, 40), generator=torch.Generator().manual_seed(4)).to(
        CUDA
    )
    fixed = torch.zeros_like(prompt, dtype=torch.bool)
    fixed[:, :10] = True
    out = sampling.sample(
        model, graph, noise, fixed_tokens=prompt, fixed_mask=fixed, steps=16, autocast_dtype=torch.bfloat16
    )
    assert out.device.type == "cuda" and out.shape == prompt.shape
    assert torch.equal(out[:, :10], prompt[:, :10])
    assert int(out.max()) < tiny_config["tokens"] and int(out.min()) >= 0


def test_sft_recipe_on_cuda_uses_bf16_and_learns(tmp_path):
    """sft.py's recipe with device=cuda: precision auto -> bf16, the loss falls, a checkpoint is written."""
    import sft
    from checkpoint import load_checkpoint
    from tests.sft_helpers import sft_config, write_qa_dataset

    data_dir = write_qa_dataset(tmp_path / "data", copies=4)
    cfg = sft_config(tmp_path / "run", data_dir, "device=cuda", "training.n_iters=100")
    assert sft.run_sft(cfg) == "done"
    log = (tmp_path / "run" / "train.log").read_text()
    assert "precision bf16" in log
    losses = [float(x) for x in re.findall(r"train: loss=([0-9.eE+-]+)", log)]
    # on CPU the same run goes from 9.8 to 2.5 (means of the first and last 10 losses)
    assert len(losses) == 100 and sum(losses[-10:]) < 0.5 * sum(losses[:10]), losses
    assert load_checkpoint(tmp_path / "run")[0]["step"] == 100
