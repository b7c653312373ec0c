"""Reward-guided sampling (rl/guidance.py): with a reward that prefers a token, SVDD and best-of-N make it more
frequent than plain sampling at the same steps and seed; one candidate is the plain sampler, token for token."""

from __future__ import annotations

import argparse

import pytest
import torch

import graph_lib
import noise_lib
import sampling
from generation import PromptFormat
from model import SEDD
from rl.guidance import (
    Guidance,
    add_guidance_args,
    guidance_from_args,
    guided_complete,
    guided_prompted_samples,
    guided_sample,
)
from tests.conftest import randomize_
from tests.rl_helpers import iid_sedd
from tests.tiny_models import GPT2_TINY, one_thread  # noqa: F401 (autouse fixture)
from tokenizer import EOS_ID, get_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


@pytest.fixture(scope="module")
def ids(tokenizer):
    return {w: tokenizer(f" {w}", add_special_tokens=False)["input_ids"][0] for w in ("yes", "no")}


YES, NO, MASK = 3, 4, 50  # a 50-token vocabulary (mask id 50): the token-level sampler needs no tokenizer


def layout(n_rows: int, prompt: list[int], length: int, mask_id: int = 50257):
    return sampling.prompt_batch([prompt] * n_rows, length, mask_id=mask_id, pad_id=0)


def yes_share(x0_hat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A value function: the share of YES tokens in each candidate's generated positions (after 2 prompt tokens)."""
    return (x0_hat[:, 2:] == YES).float().mean(dim=1)


def share_of_yes(guidance: Guidance, seed: int = 0) -> float:
    """The share of YES among 64 rows x 16 generated tokens of a model that draws YES 40% of the time."""
    model = iid_sedd({YES: 0.4, NO: 0.6}, tokens=MASK)
    tokens, fixed = layout(64, [1, 2], 18, mask_id=MASK)
    x = guided_sample(
        model,
        graph_lib.get_graph(model.config),
        noise_lib.get_noise(model.config),
        yes_share,
        fixed_tokens=tokens,
        fixed_mask=fixed,
        steps=8,
        guidance=guidance,
        generator=torch.Generator().manual_seed(seed),
    )
    assert (x[:, :2] == torch.tensor([1, 2])).all()  # the prompt is kept
    assert set(x[:, 2:].unique().tolist()) <= {YES, NO}
    return float((x[:, 2:] == YES).float().mean())


def test_guidance_makes_the_preferred_token_more_frequent():
    plain = share_of_yes(Guidance("svdd", num_candidates=1))
    assert 0.35 < plain < 0.45  # 1024 tokens: the standard error of a share is 0.015
    shares = {
        "svdd": share_of_yes(Guidance("svdd", num_candidates=4)),
        "svdd_alpha": share_of_yes(Guidance("svdd", num_candidates=4, alpha=0.05)),
        "svdd_every_2": share_of_yes(Guidance("svdd", num_candidates=4, every=2)),
        "best_of_n": share_of_yes(Guidance("best_of_n", num_candidates=4)),
    }
    # best of 4 rows of Binomial(16, 0.4) / 16 has mean about 0.53; SVDD chooses at every step and gains more
    assert all(share > plain + 0.08 for share in shares.values()), (plain, shares)
    assert shares["svdd"] > shares["best_of_n"], shares


def test_one_candidate_is_the_plain_sampler():
    model = randomize_(SEDD({**GPT2_TINY, "tokens": MASK}), seed=2).eval()
    graph, noise = graph_lib.get_graph(model.config), noise_lib.get_noise(model.config)
    tokens, fixed = layout(3, [11, 12, 13], 10, mask_id=MASK)
    plain = sampling.sample(
        model,
        graph,
        noise,
        fixed_tokens=tokens,
        fixed_mask=fixed,
        steps=5,
        generator=torch.Generator().manual_seed(7),
    )
    for method in ("svdd", "best_of_n"):
        guided = guided_sample(
            model,
            graph,
            noise,
            yes_share,
            fixed_tokens=tokens,
            fixed_mask=fixed,
            steps=5,
            guidance=Guidance(method, num_candidates=1),
            generator=torch.Generator().manual_seed(7),
        )
        assert torch.equal(guided, plain), method


def test_guided_complete_with_a_text_reward_is_seeded(tokenizer, ids):
    model = iid_sedd({ids["yes"]: 0.3, ids["no"]: 0.5, EOS_ID: 0.2})

    def says_yes(prompts, completions, **fields):
        assert fields["answer"] == ["yes"] * len(completions)  # the reference travels with each candidate
        return [float(c.split().count("yes")) for c in completions]

    def complete(guidance, seed=0):
        return guided_complete(
            model,
            graph_lib.get_graph(model.config),
            noise_lib.get_noise(model.config),
            tokenizer,
            [tokenizer.encode("Say yes:")] * 2,
            ["Say yes:"] * 2,
            says_yes,
            {"answer": ["yes", "yes"]},
            guidance=guidance,
            max_new_tokens=6,
            max_length=12,
            steps=3,
            seed=seed,
            num_samples=4,
        )

    plain, guided = complete(Guidance("svdd", 1)), complete(Guidance("svdd", 3))
    assert len(guided) == 8 and all(EOS_ID not in c.tokens for c in guided)
    assert [c.tokens for c in guided] == [c.tokens for c in complete(Guidance("svdd", 3))]
    count = {
        name: sum(c.text.split().count("yes") for c in out) for name, out in (("p", plain), ("g", guided))
    }
    assert count["g"] > count["p"] + 3, count


def test_guided_prompted_samples_report_the_reward(tokenizer, ids):
    model = iid_sedd({ids["yes"]: 0.5, EOS_ID: 0.5})
    fmt = PromptFormat(template="Question: {question}\nAnswer:", max_length=24, pad_with_eos=True)
    records = guided_prompted_samples(
        model,
        graph_lib.get_graph(model.config),
        noise_lib.get_noise(model.config),
        tokenizer,
        ["Say yes", "Say yes twice"],
        fmt,
        reward_fn=lambda p, c, **f: [float(len(x.split())) for x in c],
        guidance=Guidance("best_of_n", 3),
        steps=4,
        num_samples=2,
    )
    assert [(r["prompt"], r["sample"]) for r in records] == [
        ("Say yes", 0),
        ("Say yes", 1),
        ("Say yes twice", 0),
        ("Say yes twice", 1),
    ]
    assert all(r["reward"] == float(len(r["completion"].split())) for r in records)


def test_guidance_flags_and_their_errors():
    parser = argparse.ArgumentParser()
    add_guidance_args(parser)
    assert guidance_from_args(parser.parse_args([])) is None
    args = parser.parse_args(["--guidance", "svdd", "--guidance_candidates", "8", "--guidance_alpha", "0.1"])
    guidance, reward = guidance_from_args(args)
    assert guidance == Guidance("svdd", 8, 0.1, 1)
    assert reward(["q"], ["#### 3"], answer=["3"]) == [1.0]
    args = parser.parse_args(
        ["--guidance", "best_of_n", "--reward", "format", "--reward_kwargs", '{"pattern": "yes"}']
    )
    assert guidance_from_args(args)[1](["q", "q"], ["yes", "no"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="not valid JSON"):
        guidance_from_args(parser.parse_args(["--guidance", "svdd", "--reward_kwargs", "{pattern"]))
    with pytest.raises(ValueError, match="must be at least 1"):
        Guidance("svdd", num_candidates=0)
    with pytest.raises(ValueError, match="choose one of"):
        Guidance("beam")
    with pytest.raises(ValueError, match=">= 0"):
        Guidance("svdd", alpha=-1.0)
