"""The SEDD transformer: parity with an independent float64 reference of the original network, dropout,
the `output_mask` fast path, padding invariance and the attention kernel."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from model import SEDD
from model.attention import attention, sdpa_attention
from model.transformer import padded_linear
from tests.reference_sedd import reference_forward, softmax_attention

ATOL = 1e-5  # float32 network vs float64 reference; outputs are O(1)-O(10)


def make_inputs(model: SEDD, batch: int = 3, seq_len: int = 12, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, model.vocab_size, (batch, seq_len), generator=gen)
    sigma = torch.rand(batch, generator=gen) * 3 + 0.05
    sigma[0] = 0.3  # below the 0.5 expm1 switch
    return indices, sigma


def padding_mask(lengths: list[int], seq_len: int) -> torch.Tensor:
    return (torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]).long()


def test_random_weights_are_nontrivial(tiny_model):
    indices, sigma = make_inputs(tiny_model)
    with torch.no_grad():
        out = tiny_model(indices, sigma)
    # the adaLN / output layers start at zero; the fixture must give outputs that vary over the vocabulary
    assert out.std(dim=-1).min() > 0.05


def test_parity_with_reference(tiny_model, tiny_config):
    indices, sigma = make_inputs(tiny_model)
    with torch.no_grad():
        ours = tiny_model(indices, sigma)
    ref = reference_forward(tiny_model.state_dict(), tiny_config, indices, sigma)
    assert ours.dtype == torch.float32 and ours.shape == (3, 12, tiny_config["tokens"] + 1)
    torch.testing.assert_close(ours.double(), ref, atol=ATOL, rtol=0)


def test_parity_with_reference_padding_mask(tiny_model, tiny_config):
    indices, sigma = make_inputs(tiny_model, batch=3, seq_len=12)
    mask = padding_mask([12, 7, 3], 12)
    with torch.no_grad():
        ours = tiny_model(indices, sigma, mask)
    ref = reference_forward(tiny_model.state_dict(), tiny_config, indices, sigma, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real].double(), ref[real], atol=ATOL, rtol=0)
    # the mask matters: without it the short sequences attend to their padding
    unmasked = reference_forward(tiny_model.state_dict(), tiny_config, indices, sigma)
    assert (unmasked[1, :7] - ref[1, :7]).abs().max() > 1e-3


def test_parity_without_scale_by_sigma(tiny_config, make_model):
    tiny_config["model"]["scale_by_sigma"] = False
    model = make_model(tiny_config, seed=3)
    indices, sigma = make_inputs(model, seed=4)
    with torch.no_grad():
        ours = model(indices, sigma)
    ref = reference_forward(model.state_dict(), tiny_config, indices, sigma)
    torch.testing.assert_close(ours.double(), ref, atol=ATOL, rtol=0)


def test_scale_by_sigma_shift_and_input_entry(tiny_model, tiny_config):
    """With scale_by_sigma the output is shifted by -log(e^sigma - 1) - log(V - 1); the input token's entry is 0."""
    indices, sigma = make_inputs(tiny_model)
    plain = copy.deepcopy(tiny_model)
    plain.scale_by_sigma = False
    with torch.no_grad():
        scaled, unscaled = tiny_model(indices, sigma), plain(indices, sigma)
    shift = torch.log(torch.expm1(sigma.double())) + math.log(tiny_model.vocab_size - 1)
    off_input = torch.ones_like(scaled, dtype=torch.bool).scatter(-1, indices[..., None], False)
    diff = (unscaled - scaled).double()[off_input].view(3, 12, -1)
    torch.testing.assert_close(diff, shift[:, None, None].expand_as(diff), atol=ATOL, rtol=0)
    assert torch.all(torch.gather(scaled, -1, indices[..., None]) == 0)


def test_dropout_train_vs_eval(tiny_config, make_model):
    tiny_config["model"]["dropout"] = 0.3
    model = make_model(tiny_config)
    indices, sigma = make_inputs(model)
    model.eval()
    with torch.no_grad():
        eval_a = model(indices, sigma)
        eval_b = model(indices, sigma)
    assert torch.equal(eval_a, eval_b)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        train_a = model(indices, sigma)
        train_b = model(indices, sigma)
    assert (train_a - eval_a).abs().max() > 1e-3
    assert (train_a - train_b).abs().max() > 1e-3


def test_output_mask_selects_rows_exactly(tiny_model):
    """The output_mask rows are the full output's rows up to float32 rounding (a few ulp).

    Bitwise equality is not attainable on CPU: BLAS picks a different GEMM kernel for a [N, hidden] input than
    for [B * L, hidden] (or [B, cond] vs [N, cond] in the adaLN), e.g. nn.Linear on 1 of 3 rows differs from
    row 1 of the full product by 1 ulp. rtol 1e-6 is ~8 ulp of float32; any real indexing error is O(1).
    """
    indices, sigma = make_inputs(tiny_model, batch=3, seq_len=12)
    attention_mask = padding_mask([12, 9, 5], 12)
    gen = torch.Generator().manual_seed(7)
    output_mask = (torch.rand(3, 12, generator=gen) < 0.4) & attention_mask.bool()
    output_mask[2, 0] = True
    with torch.no_grad():
        full = tiny_model(indices, sigma, attention_mask)
        rows = tiny_model(indices, sigma, attention_mask, output_mask=output_mask)
    assert rows.shape == (int(output_mask.sum()), tiny_model.vocab_size)
    torch.testing.assert_close(rows, full[output_mask], rtol=1e-6, atol=1e-6)
    # a shifted selection must not match (the check is sensitive to row order)
    assert (rows[1:] - full[output_mask][:-1]).abs().max() > 1e-2


@pytest.mark.parametrize("bias", [True, False])
def test_padded_linear_equals_linear_with_gradients(bias):
    """The CUDA output layer's row padding (51 rows computed as 64, sliced back) gives linear's values and
    gradients (fp32, a few ulp: the padded GEMM may block differently)."""
    gen = torch.Generator().manual_seed(3)
    linear = torch.nn.Linear(16, 51, bias=bias)
    with torch.no_grad():
        for p in linear.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(2, 7, 16, generator=gen, requires_grad=True)
    upstream = torch.randn(2, 7, 51, generator=gen)
    padded = padded_linear(x, linear, 64)
    assert padded.shape == (2, 7, 51)
    grads = torch.autograd.grad((padded * upstream).sum(), [x, *linear.parameters()])
    plain = linear(x)
    expected = torch.autograd.grad((plain * upstream).sum(), [x, *linear.parameters()])
    torch.testing.assert_close(padded, plain, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_padded_linear_under_bf16_autocast_matches_linear():
    """Under autocast the padding is applied to autocast's bf16 copy of the weight: the output is bf16 and equal
    to autocast's own linear up to bf16 rounding."""
    gen = torch.Generator().manual_seed(4)
    linear = torch.nn.Linear(32, 50, bias=True)
    x = torch.randn(5, 32, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        padded, plain = padded_linear(x, linear, 64), linear(x)
    assert padded.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(padded.float(), plain.float(), rtol=1e-2, atol=1e-2)
    # 50 rows are already a multiple of 10: plain linear, bitwise
    torch.testing.assert_close(padded_linear(x, linear, 10), linear(x), rtol=0, atol=0)


def test_padding_invariance(tiny_model):
    indices, sigma = make_inputs(tiny_model, batch=3, seq_len=10)
    mask = padding_mask([10, 6, 2], 10)
    real = mask.bool()
    with torch.no_grad():
        base = tiny_model(indices, sigma, mask)

        # other ids at padded positions
        gen = torch.Generator().manual_seed(11)
        other = torch.where(
            real, indices, torch.randint(0, tiny_model.vocab_size, indices.shape, generator=gen)
        )
        assert not torch.equal(other, indices)
        changed = tiny_model(other, sigma, mask)
        torch.testing.assert_close(changed[real], base[real], atol=1e-5, rtol=0)

        # more padding appended on the right
        extra = torch.randint(0, tiny_model.vocab_size, (3, 5), generator=gen)
        longer = tiny_model(
            torch.cat([indices, extra], dim=1), sigma, torch.cat([mask, torch.zeros(3, 5).long()], 1)
        )
        torch.testing.assert_close(longer[:, :10][real], base[real], atol=1e-5, rtol=0)

        # an all-ones mask is the same as no mask
        torch.testing.assert_close(
            tiny_model(indices, sigma, torch.ones_like(mask)), tiny_model(indices, sigma), atol=1e-6, rtol=0
        )


def test_sdpa_matches_explicit_softmax_attention():
    gen = torch.Generator().manual_seed(5)
    batch, seq_len, heads, head_dim = 3, 9, 4, 16
    qkv = torch.randn(batch, seq_len, 3, heads, head_dim, generator=gen, dtype=torch.float64)
    mask = padding_mask([9, 4, 1], seq_len)
    ref = softmax_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask)
    real = mask.bool()
    for kernel in (sdpa_attention, attention):
        out = kernel(qkv.float(), mask)
        assert out.shape == (batch, seq_len, heads, head_dim)
        torch.testing.assert_close(out.double()[real], ref[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        sdpa_attention(qkv.float()).double(),
        softmax_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]),
        atol=1e-5,
        rtol=0,
    )


@pytest.mark.parametrize("seq_len", [4, 16])
def test_rotary_cache_serves_shorter_and_longer_sequences(tiny_model, tiny_config, seq_len):
    """Outputs do not depend on which sequence lengths were seen before (the cos/sin cache)."""
    indices, sigma = make_inputs(tiny_model, batch=2, seq_len=seq_len)
    with torch.no_grad():
        tiny_model(*make_inputs(tiny_model, batch=2, seq_len=8))
        ours = tiny_model(indices, sigma)
    ref = reference_forward(tiny_model.state_dict(), tiny_config, indices, sigma)
    torch.testing.assert_close(ours.double(), ref, atol=ATOL, rtol=0)


def test_unpadded_sequences_equal_padded_batch_with_mask(tiny_model):
    """Each sequence run alone at its real length (no padding, no mask) gives the padded batch's outputs at
    its real positions: attention with the key mask is exactly attention over the unpadded sequence."""
    lengths = [12, 7, 3]
    indices, sigma = make_inputs(tiny_model, batch=3, seq_len=12, seed=4)
    mask = padding_mask(lengths, 12)
    with torch.no_grad():
        padded = tiny_model(indices, sigma, mask)
        for b, n in enumerate(lengths):
            alone = tiny_model(indices[b : b + 1, :n], sigma[b : b + 1])
            torch.testing.assert_close(alone[0], padded[b, :n], atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_activation_checkpointing_same_loss_and_gradients(tiny_config, make_model, dropout):
    """training.prepare_model(activation_checkpointing=True) recomputes the blocks in backward: same outputs and
    gradients (with dropout too: the recomputation replays the same RNG state), eval/no-grad paths unchanged."""
    from training import prepare_model

    config = copy.deepcopy(tiny_config)
    config["model"]["dropout"] = dropout
    indices, sigma = make_inputs(make_model(config), batch=2, seq_len=10)
    mask = padding_mask([10, 6], 10)
    results, saved = [], []
    for checkpointing in (False, True):
        model = make_model(config, seed=3).train()
        forward_model = prepare_model(model, activation_checkpointing=checkpointing)
        torch.manual_seed(0)
        count = [0]

        def pack(t, count=count):
            count[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward_model(indices, sigma, mask)
        (out[mask.bool()].tanh().sum()).backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
        saved.append(count[0])
    assert saved[1] < saved[0] / 2  # the blocks' activations are not kept
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def _segment_sdpa(q, k, v, cu_seqlens):
    """A stand-in varlen kernel: SDPA within each cu_seqlens segment of packed q, k, v [T, H, D]."""
    out = torch.empty_like(q)
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        qkv = torch.stack([q[start:end], k[start:end], v[start:end]], dim=1)
        out[start:end] = sdpa_attention(qkv[None])[0]
    return out


@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_varlen_plumbing_equals_sdpa(tiny_model, monkeypatch, backend):
    """Both varlen paths (flash-attn's qkv-packed function, torch's varlen_attn) get the packing, cu_seqlens
    and max_len right: run on CPU with stand-in kernels that attend within each cu_seqlens segment, they equal
    the SDPA path at real positions, with and without padding (a hole in the middle of a row included: only the
    grouping by sequence matters). The real kernels are compared on CUDA in tests/test_cuda.py."""
    import sys
    import types

    from model import attention as attention_module

    calls = []

    def flash_varlen(qkv, cu_seqlens, max_len, dropout_p, causal):
        assert qkv.dim() == 4 and dropout_p == 0.0 and not causal and cu_seqlens.dtype == torch.int32
        calls.append(int(max_len))
        return _segment_sdpa(*qkv.unbind(1), cu_seqlens)

    def torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
        assert q.dim() == 3 and cu_q is cu_k and max_q == max_k and cu_q.dtype == torch.int32
        calls.append(int(max_q))
        return _segment_sdpa(q, k, v, cu_q)

    if backend == "flash_attn":
        monkeypatch.setitem(
            sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_qkvpacked_func=flash_varlen)
        )
        kernel = attention_module._flash_attn_varlen
    else:
        monkeypatch.setattr(attention_module, "torch_varlen_attn", torch_varlen)
        kernel = attention_module._torch_varlen
    indices, sigma = make_inputs(tiny_model, batch=3, seq_len=12, seed=6)
    mask = padding_mask([12, 7, 3], 12)
    mask[0, 4:6] = 0
    n_blocks = len(tiny_model.blocks)
    for attention_mask, max_len in ((mask, 10), (None, 12)):
        calls.clear()
        with torch.no_grad():
            monkeypatch.setattr(attention_module, "varlen_kernel", lambda qkv: kernel)
            varlen = tiny_model(indices, sigma, attention_mask)
            padded = attention_module.attention(torch.randn(2, 5, 3, 2, 4), padding_mask([5, 2], 5))
            monkeypatch.setattr(attention_module, "varlen_kernel", lambda qkv: None)
            sdpa = tiny_model(indices, sigma, attention_mask)
        # the model packs once when padded; unpadded it uses SDPA (already a flash kernel on CUDA)
        assert calls == ([max_len] * n_blocks if attention_mask is not None else []) + [5]
        real = torch.ones_like(mask).bool() if attention_mask is None else mask.bool()
        torch.testing.assert_close(varlen[real], sdpa[real], rtol=1e-5, atol=1e-5)
        assert padded.shape == (2, 5, 2, 4) and padded[1, 2:].abs().sum() == 0
