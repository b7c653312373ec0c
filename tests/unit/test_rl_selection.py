"""What ReFT keeps and how reward-weighted denoising weighs, on hand-made rewards (rl/reft.py, rl/rwd.py)."""

from __future__ import annotations

import math

import pytest
import torch

from rl.reft import ReFT, select_reft
from rl.rwd import RewardWeighted, reward_weights, systematic_resample

# 3 prompts x k=4 completions, prompt-major (row b * 4 + g)
REWARDS = [
    0.0, 1.0, 0.5, 1.0,  # prompt 0: two correct, the first (row 1) wins the tie
    0.0, 0.0, 0.0, 0.0,  # prompt 1: nothing good
    0.2, 0.9, 1.5, 1.2,  # prompt 2: row 10 is the best
]  # fmt: skip
KEYS = ["a", "b", "c", "b", "d", "d", "d", "d", "e", "f", "g", "h"]  # rows 1 and 3 are the same completion


@pytest.mark.parametrize(
    ("options", "rows"),
    [
        ({"selection": "best", "threshold": 1.0}, [1, 10]),  # prompt 1's best (0.0) is under the threshold
        ({"selection": "best", "threshold": None}, [1, 4, 10]),  # the best of every prompt
        ({"selection": "best", "threshold": 0.0}, [1, 4, 10]),
        ({"selection": "threshold", "threshold": 1.0}, [1, 3, 10, 11]),
        ({"selection": "threshold", "threshold": 1.0, "keys": KEYS}, [1, 10, 11]),  # dedupe drops row 3
        ({"selection": "threshold", "threshold": 0.5, "max_per_prompt": 2}, [1, 3, 10, 11]),  # best 2 each
        ({"selection": "threshold", "threshold": 0.5, "max_per_prompt": 1, "keys": KEYS}, [1, 10]),
        ({"selection": "threshold", "threshold": 0.0, "keys": KEYS}, [0, 1, 2, 4, 8, 9, 10, 11]),
        ({"selection": "threshold", "threshold": 2.0}, []),
    ],
)
def test_reft_keeps_exactly_the_intended_rows(options, rows):
    selection = select_reft(REWARDS, 4, **options)
    assert selection.rows == rows
    assert selection.weights == [1.0] * len(rows)
    assert selection.metrics["acceptance"] == pytest.approx(len(rows) / 12)


def test_reft_metrics():
    selection = select_reft(REWARDS, 4, selection="best", threshold=1.0)
    assert selection.metrics == pytest.approx(
        {"acceptance": 2 / 12, "prompts_kept": 2 / 3, "kept_reward_mean": (1.0 + 1.5) / 2}
    )


def test_reft_method_applies_dedupe_and_checks_options():
    kept = ReFT(selection="threshold", threshold=1.0, dedupe=True).select(REWARDS, 4, keys=KEYS).rows
    assert kept == [1, 10, 11]
    kept = ReFT(selection="threshold", threshold=1.0, dedupe=False).select(REWARDS, 4, keys=KEYS).rows
    assert kept == [1, 3, 10, 11]
    with pytest.raises(ValueError, match="choose one of"):
        ReFT(selection="top")
    with pytest.raises(ValueError, match="needs rl.method.threshold"):
        ReFT(selection="threshold", threshold=None)
    with pytest.raises(ValueError, match="max_per_prompt=0 must be >= 1"):
        ReFT(max_per_prompt=0)
    with pytest.raises(ValueError, match="do not form groups of k=5"):
        select_reft(REWARDS, 5)


# ----------------------------------------------------------------------------- reward-weighted denoising
def test_exp_weights_by_hand():
    # group of 4 with rewards 0, 0, 0, 1: mean 1/4, population std sqrt(3)/4
    std = math.sqrt(3) / 4
    a_wrong, a_right = -0.25 / std, 0.75 / std
    w = reward_weights([0.0, 0.0, 0.0, 1.0], [0, 0, 0, 0], weighting="exp", beta=1.0, max_weight=100.0)
    expected = [math.exp(a_wrong)] * 3 + [math.exp(a_right)]
    assert w.tolist() == pytest.approx(expected, rel=1e-5)
    # beta = 0.5 doubles the exponent: exp(2 * 1.732) = 31.9 is clipped at max_weight = 20
    w = reward_weights([0.0, 0.0, 0.0, 1.0], [0, 0, 0, 0], weighting="exp", beta=0.5, max_weight=20.0)
    assert w.tolist() == pytest.approx([math.exp(2 * a_wrong)] * 3 + [20.0], rel=1e-5)


def test_softmax_weights_sum_to_group_size_and_clip():
    rewards = [0.0, 1.0, 2.0, 5.0, 5.0]
    groups = [0, 0, 0, 1, 1]
    w = reward_weights(rewards, groups, weighting="softmax", beta=1.0, max_weight=100.0)
    e = [math.exp(0), math.exp(1), math.exp(2)]
    assert w[:3].tolist() == pytest.approx([3 * x / sum(e) for x in e], rel=1e-5)
    assert float(w[:3].sum()) == pytest.approx(3.0)
    assert w[3:].tolist() == pytest.approx([1.0, 1.0])  # equal rewards: uniform, summing to the group size
    capped = reward_weights(rewards, groups, weighting="softmax", beta=0.1, max_weight=2.5)
    assert capped[:3].tolist() == pytest.approx([0.0, 3 * math.exp(-10) / (1 + math.exp(-10)), 2.5], abs=1e-4)


@pytest.mark.parametrize("weighting", ["exp", "softmax"])
def test_equal_rewards_give_uniform_weights(weighting):
    w = reward_weights([0.3] * 6, [0, 0, 0, 1, 1, 1], weighting=weighting, beta=0.1)
    assert w.tolist() == pytest.approx([1.0] * 6)


def test_group_versus_batch_normalisation():
    # prompt 0 is easy (all right), prompt 1 hard (one right): within groups, prompt 0's answers are average
    rewards = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    options = {
        "weighting": "exp",
        "beta": 1.0,
        "max_weight": 1e3,
        "skip_uniform": False,
        "batching": "weight",
    }
    group = RewardWeighted(normalize="group", **options).select(rewards, 3)
    batch = RewardWeighted(normalize="batch", **options).select(rewards, 3)
    assert group.rows == batch.rows == list(range(6))
    assert group.weights[:3] == pytest.approx([1.0] * 3)
    a = (1 - 1 / 3) / math.sqrt(2 / 9)
    assert group.weights[3:] == pytest.approx([math.exp(-a / 2)] * 2 + [math.exp(a)], rel=1e-5)
    # over the batch (mean 2/3, std sqrt(2)/3) every right answer weighs the same
    a_right, a_wrong = (1 / 3) / (math.sqrt(2) / 3), -(2 / 3) / (math.sqrt(2) / 3)
    expected = [math.exp(a_right)] * 3 + [math.exp(a_wrong)] * 2 + [math.exp(a_right)]
    assert batch.weights == pytest.approx(expected, rel=1e-5)


def test_rwd_metrics_and_kl_shaping():
    method = RewardWeighted(
        weighting="softmax", beta=1.0, max_weight=10.0, kl_coef=0.5, skip_uniform=False, batching="weight"
    )
    plain = method.select([1.0, 1.0], 2)
    assert plain.weights == pytest.approx([1.0, 1.0])
    assert plain.metrics["weight_ess"] == pytest.approx(1.0)
    # the same reward, but the second completion moved 2 nats from the start: shaped 1 - 0 vs 1 - 1
    shaped = method.select([1.0, 1.0], 2, kl=[0.0, 2.0])
    e = [1.0, math.exp(-1.0)]
    assert shaped.weights == pytest.approx([2 * x / sum(e) for x in e], rel=1e-5)
    assert shaped.metrics["weight_ess"] < 1.0


def test_rwd_skips_groups_without_signal():
    rewards = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]  # all right, one right, all wrong
    options = {"weighting": "exp", "beta": 1.0, "max_weight": 1e3, "batching": "weight"}
    skipping = RewardWeighted(**options).select(rewards, 3)
    keeping = RewardWeighted(**options, skip_uniform=False).select(rewards, 3)
    assert skipping.rows == [3, 4, 5] and keeping.rows == list(range(9))
    assert skipping.weights == pytest.approx(keeping.weights[3:6])
    assert skipping.metrics["acceptance"] == pytest.approx(1 / 3)


def test_systematic_resampling_draws_in_proportion():
    assert systematic_resample(torch.tensor([1.0, 1.0, 1.0, 1.0]), 4).tolist() == [0, 1, 2, 3]
    # expected counts 6 * [0.1, 0.6, 0.3] = [0.6, 3.6, 1.8] -> cumulative 0.6, 4.2, 6 rounded: 1, 4, 6
    assert systematic_resample(torch.tensor([0.1, 0.6, 0.3]), 6).tolist() == [0, 1, 1, 1, 2, 2]
    draws = systematic_resample(torch.rand(50, generator=torch.Generator().manual_seed(0)), 1000)
    assert len(draws) == 1000 and draws.tolist() == sorted(draws.tolist())
    with pytest.raises(ValueError, match="positive sum"):
        systematic_resample(torch.zeros(3), 3)


def test_rwd_resampling_keeps_the_number_of_examples_with_unit_weights():
    rewards = [0.0, 0.0, 0.0, 1.0]  # exp weights 0.56 x 3 and 5.65 (beta 1): 4 draws -> the right one 3 times
    resampled = RewardWeighted(weighting="exp", beta=1.0).select(rewards, 4)
    assert resampled.rows == [1, 3, 3, 3] and resampled.weights == [1.0] * 4
    assert resampled.metrics["resampled_unique"] == 0.5


def test_rwd_groups_of_different_sizes_and_option_errors():
    w = reward_weights(torch.tensor([1.0, 0.0, 3.0]), torch.tensor([7, 7, 2]), weighting="softmax", beta=1.0)
    assert w.tolist() == pytest.approx([2 * math.e / (1 + math.e), 2 / (1 + math.e), 1.0], rel=1e-5)
    with pytest.raises(ValueError, match="choose one of"):
        RewardWeighted(weighting="linear")
    with pytest.raises(ValueError, match="choose one of"):
        RewardWeighted(normalize="prompt")
    with pytest.raises(ValueError, match="choose one of"):
        RewardWeighted(batching="sample")
    with pytest.raises(ValueError, match="must be > 0"):
        RewardWeighted(beta=0.0)
    with pytest.raises(ValueError, match="one group id per reward"):
        reward_weights([1.0, 2.0], [0], beta=1.0)
