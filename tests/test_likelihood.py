"""The likelihood bound: a model overfit on a few sequences gives them a far lower bound than a fresh model; the
seeded estimate is reproducible and independent of the batch size; SFT data is scored on responses only;
the generative perplexity matches the causal LM's own loss."""

from __future__ import annotations

import math

import pytest
import torch

import graph_lib
import noise_lib
from likelihood import causal_lm_nll, load_causal_lm, negative_elbo, sft_batches, text_batches
from model import SEDD
from tests.tiny_models import one_thread, save_tiny_causal_lm  # noqa: F401 (autouse fixture)
from training import batch_loss, build_optimizer, example_noise


def blocks(n: int, length: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": row.tolist()} for row in torch.randint(0, 50, (n, length), generator=gen)]


def bound(model, data, batch_size=2, n_t=16, seed=0) -> float:
    graph, noise = graph_lib.get_graph(model.config), noise_lib.get_noise(model.config)
    return negative_elbo(
        model, graph, noise, text_batches(data, batch_size), n_t=n_t, seed=seed
    ).nats_per_token


def test_overfit_model_has_far_lower_bound_on_its_data(tiny_config):
    torch.manual_seed(0)
    model = SEDD(tiny_config)
    fresh = SEDD(tiny_config)
    fresh.load_state_dict(model.state_dict())
    graph, noise = graph_lib.get_graph(model.config), noise_lib.get_noise(model.config)
    seen, unseen = blocks(4, 16, seed=0), blocks(4, 16, seed=1)
    batch = next(text_batches(seen, 4))[1]
    optimizer = build_optimizer(list(model.parameters()), lr=3e-3)
    model.train()
    for step in range(300):
        draws = example_noise(range(4), 16, seed=1, step=step, device=torch.device("cpu"))
        batch_loss(model, batch, graph, noise, draws).mean_per_token().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    fresh.eval()
    before, after = bound(fresh, seen), bound(model, seen)
    assert before == pytest.approx(math.log(49), rel=0.1)  # a fresh model is near uniform over the 49 tokens
    assert after < 0.5 * before
    assert bound(model, unseen) > before  # memorised, not generally better


def test_seeded_bound_is_reproducible_and_batch_independent(tiny_model):
    data = blocks(3, 12, seed=2)
    first = bound(tiny_model, data, batch_size=2)
    assert bound(tiny_model, data, batch_size=2) == first
    assert bound(tiny_model, data, batch_size=1) == pytest.approx(first, rel=1e-5)
    assert bound(tiny_model, data, batch_size=3) == pytest.approx(first, rel=1e-5)
    assert bound(tiny_model, data, batch_size=2, seed=1) != first


def test_sft_batches_score_the_response_only(tiny_model):
    examples = [
        {"input_ids": [5, 6, 7, 8, 9, 49], "prompt_len": 3},  # prompt 5 6 7, response 8 9 + EOS (49 here)
        {"input_ids": [10, 11, 12, 49], "prompt_len": 1},
    ]
    indices, batch = next(sft_batches(examples, batch_size=2, eos_id=49))
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 0, 0]]
    assert batch["n_tokens"].tolist() == [3, 3]
    _, padded = next(sft_batches(examples, batch_size=2, eos_id=49, pad_to=8))
    assert padded["loss_mask"].tolist() == [
        [0, 0, 0, 1, 1, 1, 1, 1],
        [0, 1, 1, 1, 1, 1, 1, 1],
    ]  # EOS fill scored
    assert padded["input_ids"][1].tolist() == [10, 11, 12, 49, 49, 49, 49, 49]
    assert padded["n_tokens"].tolist() == [3, 3]  # still per response token
    graph, noise = graph_lib.get_graph(tiny_model.config), noise_lib.get_noise(tiny_model.config)
    result = negative_elbo(tiny_model, graph, noise, sft_batches(examples, 2, eos_id=49), n_t=4)
    assert (result.tokens, result.sequences) == (6, 2)
    # the prompt is never perturbed: changing the draws on prompt positions cannot matter, so the per-token
    # loss there is exactly zero for every draw
    terms = batch_loss(tiny_model, batch, graph, noise, example_noise(indices, 6, 0, 0, torch.device("cpu")))
    assert (terms.per_token[batch["loss_mask"] == 0] == 0).all()


def test_generative_perplexity_matches_the_causal_lm_loss(tmp_path):
    lm, tokenizer = load_causal_lm(save_tiny_causal_lm(tmp_path / "lm"))
    text = "The cat sat on the mat, and then it slept."
    result = causal_lm_nll([text], lm, tokenizer)
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(text)["input_ids"]]])
    with torch.no_grad():
        expected = lm(input_ids=ids, labels=ids).loss.item()  # mean over the shifted tokens
    assert result.tokens == ids.shape[1] - 1
    assert result.nats_per_token == pytest.approx(expected, rel=1e-5)
    # batched with padding: the same per-text sums
    other = "A short one."
    both = causal_lm_nll([text, other], lm, tokenizer, batch_size=2)
    alone = causal_lm_nll([other], lm, tokenizer)
    assert both.nats == pytest.approx(result.nats + alone.nats, rel=1e-5)


def test_missing_causal_lm_says_how_to_get_it(tmp_path):
    with pytest.raises(OSError, match="huggingface-cli download"):
        load_causal_lm("no-such-org/no-such-causal-lm")
    with pytest.raises(OSError, match="--eval_model"):
        load_causal_lm(tmp_path / "missing")
