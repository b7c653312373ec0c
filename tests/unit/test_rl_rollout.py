"""Rollouts (rl/rollout.py) and their training examples (rl/buffer.py): k completions per prompt, prompt-major,
the prompt kept, cut at EOS, the same seed gives the same tokens; EMA weights are swapped in and back."""

from __future__ import annotations

import pytest
import torch

import graph_lib
import noise_lib
from model.ema import ExponentialMovingAverage
from rl.buffer import ExampleBuffer, collate, make_example
from rl.rollout import generate_rollouts, policy_weights
from tests.rl_helpers import YES
from tests.tiny_models import one_thread, tiny_sedd, token_preferring_sedd  # noqa: F401 (autouse fixture)
from tokenizer import EOS_ID, get_tokenizer
from training import TrainState

PROMPTS = ["What is 2 + 3?", "Tom has 23 apples and buys 45 more. How many apples does Tom have now?"]


def rollout(model, tokenizer, *, k=3, seed=0, pad_with_eos=True, max_new_tokens=8):
    prompt_ids = tokenizer(PROMPTS, add_special_tokens=False)["input_ids"]
    return generate_rollouts(
        model,
        graph_lib.get_graph(model.config),
        noise_lib.get_noise(model.config),
        tokenizer,
        prompt_ids,
        PROMPTS,
        {"answer": ["5", "68"]},
        k=k,
        max_length=32,
        pad_with_eos=pad_with_eos,
        max_new_tokens=max_new_tokens,
        steps=4,
        seed=seed,
        batch_size=4,
    )


def test_k_completions_per_prompt_keep_the_prompt_and_stop_at_eos():
    tokenizer = get_tokenizer()
    model = token_preferring_sedd({YES: 0.7, EOS_ID: 0.3})
    out = rollout(model, tokenizer, k=3)
    prompt_ids = tokenizer(PROMPTS, add_special_tokens=False)["input_ids"]
    assert len(out) == 6 and out.group.tolist() == [0, 0, 0, 1, 1, 1]
    assert out.row_questions() == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    assert out.row_fields() == {"answer": ["5"] * 3 + ["68"] * 3}
    assert out.input_ids.shape == (6, 32)  # the EOS-filled canvas of the starting model
    for r in range(6):
        prompt = prompt_ids[out.group[r]]
        n_prompt, n_answer = len(prompt), len(out.tokens[r])
        assert out.input_ids[r, :n_prompt].tolist() == prompt
        assert out.prompt_len[r] == n_prompt
        assert set(out.tokens[r]) <= {YES}  # cut at the first EOS: none inside the completion
        assert out.completion_len[r] == n_answer and out.finished[r]
        assert out.texts[r] == tokenizer.decode(out.tokens[r])
        assert out.input_ids[r, n_prompt : n_prompt + n_answer].tolist() == out.tokens[r]
        assert (out.input_ids[r, n_prompt + n_answer :] == EOS_ID).all()  # its EOS, then the EOS fill
        # scored: the completion, its EOS and the fill; never the prompt
        assert out.completion_mask[r].tolist() == [False] * n_prompt + [True] * (32 - n_prompt)
    assert 0 < sum(out.completion_len.tolist()) < 6 * 20  # some " yes", and the EOS ends them early


def test_unfinished_completion_gets_no_eos_and_padding_is_not_scored():
    tokenizer = get_tokenizer()
    model = token_preferring_sedd({YES: 1.0})  # never ends
    out = rollout(model, tokenizer, k=2, pad_with_eos=False, max_new_tokens=5)
    assert out.tokens == [[YES] * 5] * 4 and not out.finished.any()
    batch = out.batch(range(4), EOS_ID, pad_to=None)
    for r in range(4):
        n = int(out.prompt_len[r])
        assert batch["input_ids"][r, : n + 5].tolist()[n:] == [YES] * 5
        assert batch["loss_mask"][r].bool().logical_and(batch["attention_mask"][r].bool()).sum() == 5


def test_same_seed_same_tokens_other_seed_differs():
    tokenizer = get_tokenizer()
    model = tiny_sedd(seed=1)
    first, again, other = (rollout(model, tokenizer, seed=s).tokens for s in (3, 3, 4))
    assert first == again
    assert first != other
    assert len({tuple(t) for t in first[:3]}) > 1  # the k completions of a prompt differ


def test_examples_are_sft_examples_with_weights():
    example = make_example([1, 2], [3, 4], finished=True, eos_id=9, weight=2.5)
    assert example == {"input_ids": [1, 2, 3, 4, 9], "prompt_len": 2, "weight": 2.5}
    assert make_example([1, 2], [3], finished=False, eos_id=9)["input_ids"] == [1, 2, 3]
    batch = collate([example, make_example([5], [6], True, 9)], eos_id=9, pad_to=6)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 9, 9], [5, 6, 9, 9, 9, 9]]
    assert batch["weight"].tolist() == [2.5, 1.0]
    scored = batch["loss_mask"].bool() & batch["attention_mask"].bool()
    assert scored.tolist() == [[False, False, True, True, True, True], [False, True, True, True, True, True]]


def test_buffer_updates_per_iteration_and_seeded_order():
    buffer = ExampleBuffer()
    examples = [{"input_ids": [i], "prompt_len": 0, "weight": 1.0} for i in range(10)]
    buffer.refill(examples, batch_size=4, epochs=2.0)  # round(2 * 10 / 4) = 5 updates
    assert (buffer.iteration, buffer.steps_left) == (1, 5)
    positions = [p for _ in range(5) for p in buffer.next_positions(4)]
    assert positions == list(range(20)) and buffer.steps_left == 0
    first_pass = [buffer.example_at(p, seed=0)["input_ids"][0] for p in range(10)]
    assert sorted(first_pass) == list(range(10))  # every example once per pass
    restored = ExampleBuffer.from_state_dict(buffer.state_dict())
    assert [restored.example_at(p, seed=0) for p in range(20)] == [
        buffer.example_at(p, seed=0) for p in range(20)
    ]
    buffer.refill([], batch_size=4, epochs=1.0)
    assert (buffer.steps_left, buffer.empty_in_row) == (0, 1)
    with pytest.raises(RuntimeError, match="refill"):
        buffer.next_positions(4)


def test_policy_weights_swaps_ema_in_and_back():
    model = torch.nn.Linear(3, 2).train()
    params = [p for p in model.parameters() if p.requires_grad]
    ema = ExponentialMovingAverage(params, decay=0.5)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    live = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=0.1)
    state = TrainState(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), ema)
    with policy_weights(state, use_ema=True) as policy:
        assert not policy.training
        assert torch.equal(params[0], ema.shadow_params[0]) and not torch.equal(params[0], live[0])
    assert model.training and all(torch.equal(p, q) for p, q in zip(params, live, strict=True))
    with policy_weights(state, use_ema=False):
        assert torch.equal(params[0], live[0])
