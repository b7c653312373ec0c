"""Diffusion DPO (rl/dpo.py) and GRPO-style policy gradient (rl/pg.py): the losses against hand-worked values,
their behaviour on one update, a tiny end-to-end run of each on a toy task that must raise its reward, and
run_rl.py with rl/method=pg|dpo (online and offline pairs) on a tiny GPT-2-vocabulary model."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

import recipe
from checkpoint import load_checkpoint
from rl.dpo import DPO, dpo_loss, select_pairs
from rl.estimators import ESTIMATORS
from rl.pg import PolicyGradient, group_advantages, grpo_loss
from tests.conftest import randomize_
from tests.rl_toy import TOY_CONFIG, method_scorer, sample_toy, toy_examples, toy_scorer, trained_toy
from tests.tiny_models import one_thread, save_hub_model, tiny_sedd  # noqa: F401  (one_thread: autouse)

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
CHOSEN, REJECTED = (1, 2), (3, 4)


def random_toy(seed: int = 0):
    from model import SEDD

    return randomize_(SEDD(TOY_CONFIG), seed).eval()


def pair_batch(method: DPO, model, scorer, n_pairs: int = 2, id_base: int = 0):
    """`n_pairs` copies of the (CHOSEN, REJECTED) pair, prepared and collated (pair j has noise id id_base + j)."""
    examples = toy_examples([CHOSEN, REJECTED] * n_pairs)
    return method.collate(method.prepare(examples, model, scorer, id_base), scorer)


# ----------------------------------------------------------------------------- DPO
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_dpo_loss_is_log_2_when_the_policy_is_the_reference(estimator):
    model = random_toy()
    method = DPO(beta=0.1, estimator=estimator)
    scorer = method_scorer(method, copy.deepcopy(model))
    terms, metrics = method.loss(model, pair_batch(method, model, scorer), scorer)
    assert metrics["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["reward_margin"] == 0 and metrics["pref_accuracy"] == 0
    # the loss of an update: log 2 per scored token, plus the score-mass term (>= 0) of elbo_normalized
    per_token = terms.per_sequence / terms.n_scored
    assert bool((per_token >= math.log(2) - 1e-6).all()) and (
        estimator == "elbo_normalized" or bool(torch.allclose(per_token, torch.full((2,), math.log(2))))
    )
    # by hand: margins 1 and -1 at beta 1
    loss, chosen, rejected = dpo_loss(
        torch.tensor([1.0, 0]), torch.tensor([0.0, 1]), torch.zeros(2), torch.zeros(2), 1.0
    )
    torch.testing.assert_close(loss, torch.tensor([math.log(1 + math.exp(-1)), math.log(1 + math.exp(1))]))


def test_one_dpo_step_raises_the_chosen_elbo_relative_to_the_rejected():
    """From the toy model fitted to its distribution (a calibrated score, as an SFT start), one SGD step on the
    DPO loss (default estimator) raises ELBO(chosen) - ELBO(rejected), measured on other draws than the
    update's, for the plain and the normalised ELBO."""
    model = trained_toy()
    reference = copy.deepcopy(model)
    method = DPO(beta=0.1, n_mc=8)
    scorer = method_scorer(method, reference)
    checks = [toy_scorer(reference, n_mc=64, seed=99, estimator=e) for e in ("elbo", "elbo_normalized")]

    def margins() -> list[float]:
        logp = [check.score(model, toy_examples([CHOSEN, REJECTED]), [5, 5]) for check in checks]
        return [float(lp[0] - lp[1]) for lp in logp]

    before = margins()
    terms, _ = method.loss(model.train(), pair_batch(method, model, scorer, n_pairs=4), scorer)
    (terms.per_sequence.sum() / terms.n_scored.sum()).backward()
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    model.eval()
    after = margins()
    assert all(a > b + 0.5 for a, b in zip(after, before, strict=True)), (before, after)
    _, metrics = method.loss(model, pair_batch(method, model, scorer, n_pairs=4), scorer)
    assert metrics["reward_margin"] > 0 and metrics["pref_accuracy"] == 1


def test_online_pairs_are_the_best_and_worst_of_each_group():
    selection = select_pairs([0.0, 1.0, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0], group_size=4)
    assert selection.rows == [1, 0] and selection.weights == [1.0, -1.0]  # group 2: all equal, no pair
    assert selection.metrics["prompts_paired"] == 0.5
    assert select_pairs([3.0, 1.0, 2.0], 1, groups=[7, 7, 7]).rows == [0, 1]


# ----------------------------------------------------------------------------- policy gradient
def test_equal_rewards_give_zero_advantage_and_no_update():
    torch.testing.assert_close(
        group_advantages([1.0, 1.0, 0.0, 2.0], [0, 0, 1, 1]), torch.tensor([0.0, 0.0, -1.0, 1.0])
    )
    # mass_coef=0: no score-mass calibration term either, which is not a policy gradient
    method = PolicyGradient(beta=0.04, skip_uniform=False, mass_coef=0.0)
    selection = method.select([1.0] * 4, group_size=4)
    assert selection.weights == [0.0] * 4
    assert PolicyGradient().select([1.0] * 4, group_size=4).rows == []  # skip_uniform: nothing to train on
    model = random_toy()
    scorer = method_scorer(method, copy.deepcopy(model))
    examples = method.prepare(
        toy_examples([CHOSEN, REJECTED, CHOSEN, (2, 3)], selection.weights), model, scorer, 0
    )
    terms, _ = method.loss(model.train(), method.collate(examples, scorer), scorer)
    terms.per_sequence.sum().backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.parameters())


def test_reinforce_with_a_baseline_is_the_k_1_special_case():
    import run_rl

    recipe.register_resolvers()
    reinforce = ["rl/method=pg", "rl.k=1", "rl.method.normalize=batch", "rl.method.clip_eps=null"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        run_rl.validate_config(compose("rl", overrides=["rl.pretrained_model=x", *reinforce]))
        with pytest.raises(ValueError, match="rl.k=1 must be at least 2"):
            run_rl.validate_config(
                compose("rl", overrides=["rl.pretrained_model=x", "rl/method=pg", "rl.k=1"])
            )
    method = PolicyGradient(normalize="batch", clip_eps=None)
    selection = method.select([1.0, 0.0, 0.5, 0.5], group_size=1)
    torch.testing.assert_close(
        torch.tensor(selection.weights), group_advantages([1.0, 0.0, 0.5, 0.5], [0] * 4)
    )


def test_clipped_objective_matches_a_hand_computed_case():
    ratios, n = torch.tensor([1.5, 0.5, 1.1, 1.0]), torch.tensor([1, 1, 2, 2])
    old = torch.zeros(4)
    logp = torch.log(ratios) * n
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    # ref two nats per token above the policy on the last sequence: k3 = e^2 - 2 - 1 there
    ref = logp + torch.tensor([0.0, 0.0, 0.0, 4.0])
    loss, parts = grpo_loss(logp, old, ref, advantages, n, clip_eps=0.2, beta=0.5)
    # min(1.5 * 1, 1.2 * 1) = 1.2; min(-0.5, -0.8) = -0.8; min(1.1, 1.1); -1 plus 0.5 * (e^2 - 3)
    expected = torch.tensor([-1.2, 0.8, -1.1, 1.0 + 0.5 * (math.exp(2) - 3)])
    torch.testing.assert_close(loss, expected)
    assert parts["clipped"].tolist() == [True, True, False, False]
    unclipped, _ = grpo_loss(logp, old, logp, advantages, n, clip_eps=None)
    torch.testing.assert_close(unclipped, torch.tensor([-1.5, 0.5, -1.1, 1.0]))


def test_ratio_is_one_on_the_first_update_and_kl_grows_after_it():
    model = random_toy()
    method = PolicyGradient(beta=0.04, n_mc=2)
    scorer = method_scorer(method, copy.deepcopy(model))
    completions = [CHOSEN, REJECTED, (2, 3), (4, 1)]
    selection = method.select([1.0, 0.0, 0.0, 1.0], group_size=4)
    examples = method.prepare(toy_examples(completions, selection.weights), model, scorer, id_base=0)
    batch = method.collate(examples, scorer)
    terms, first = method.loss(model.train(), batch, scorer)
    assert first["ratio_max_dev"] < 1e-5 and first["clip_frac"] == 0 and first["kl_ref"] < 1e-9
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    (terms.per_sequence.sum() / terms.n_scored.sum()).backward()
    optimizer.step()
    _, second = method.loss(model, batch, scorer)
    assert second["kl_ref"] > 1e-4 and second["ratio_max_dev"] > 1e-4


# ----------------------------------------------------------------------------- tiny end-to-end runs
@pytest.mark.parametrize(
    "method", [PolicyGradient(beta=0.04, n_mc=4), DPO(beta=0.5, n_mc=4)], ids=["pg", "dpo_online"]
)
def test_a_tiny_run_raises_a_synthetic_reward(method):
    """From a model fitted to the toy distribution, where the rewarded completion (3, 4) has p = 0.15: 8
    iterations of 8 groups of 8 samples, two updates each, raise its frequency far above the start."""
    model = trained_toy()
    scorer = method_scorer(method, copy.deepcopy(model))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)

    def reward_rate() -> float:
        samples = sample_toy(model.eval(), 512, torch.Generator().manual_seed(123))
        return sum(s == REJECTED for s in samples) / len(samples)

    start = reward_rate()
    for iteration in range(8):
        completions = sample_toy(model.eval(), 64, generator)
        selection = method.select([float(c == REJECTED) for c in completions], group_size=8)
        if not selection.rows:
            continue
        chosen = toy_examples([completions[r] for r in selection.rows], selection.weights)
        batch = method.collate(method.prepare(chosen, model, scorer, id_base=1000 * iteration), scorer)
        model.train()
        for _ in range(2):
            terms, _ = method.loss(model, batch, scorer)
            optimizer.zero_grad()
            (terms.per_sequence.sum() / terms.n_scored.sum()).backward()
            optimizer.step()
    end = reward_rate()
    assert start < 0.25 and end > start + 0.3, (start, end)


# ----------------------------------------------------------------------------- run_rl.py
PAIRS = [
    {"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}\n#### {a + b}", "rejected": f"{a} + {b} = {a + b + 1}\n#### {a + b + 1}"}
    for a, b in [(2, 3), (4, 1), (6, 2), (3, 3)]
]  # fmt: skip


def run_rl_tiny(tmp_path: Path, name: str, *overrides: str) -> tuple[Path, str]:
    """run_rl.py for 3 updates from a tiny random GPT-2-vocabulary model; returns the run dir and its log."""
    import run_rl

    model_dir = tmp_path / "start"
    if not model_dir.exists():
        sft_config = {
            "prompt_template": "Question: {question}\nAnswer:",
            "max_length": 40,
            "pad_with_eos": True,
        }
        save_hub_model(model_dir, tiny_sedd(), sft_config)
    run_dir = tmp_path / name
    recipe.register_resolvers()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(
            "rl",
            overrides=[
                f"rl.pretrained_model={model_dir}", "rl.dataset=demo/arithmetic", "device=cpu", "rl.k=2",
                "rl.prompts_per_iter=2", "rl.eval_prompts=2", "sampling.steps=4", "training.n_iters=3",
                "training.batch_size=2", "training.log_freq=1", "training.eval_freq=3", "training.snapshot_freq=3",
                "logging.tensorboard=False", "optim.lr=1e-3", "reward=length", "reward.target=1",
                "reward.unit=chars", *overrides,
            ],
        )  # fmt: skip
    with open_dict(cfg):
        cfg.work_dir = str(run_dir)
    run_rl.validate_config(cfg)
    assert run_rl.run_rl(cfg) == "done"
    return run_dir, (run_dir / "train.log").read_text()


def logged(log: str, name: str) -> list[float]:
    return [float(v) for v in re.findall(rf"\b{name}=([-\d.e+]+|nan)", log)]


def changed_from_start(run_dir: Path) -> bool:
    state, _ = load_checkpoint(run_dir)
    start = tiny_sedd().state_dict()
    return any(not torch.equal(state["model"][k], v) for k, v in start.items())


def test_run_rl_policy_gradient(tmp_path):
    run_dir, log = run_rl_tiny(tmp_path, "pg", "rl/method=pg")
    losses = logged(log, "loss")
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert logged(log, "clip_frac")[0] == 0 and logged(log, "ratio_max_dev")[0] < 1e-4  # first inner update
    assert (
        logged(log, "kl_ref")
        and (run_dir / "hf_model" / "config.json").is_file()
        and changed_from_start(run_dir)
    )


def test_run_rl_dpo_online_and_offline(tmp_path):
    run_dir, log = run_rl_tiny(tmp_path, "online", "rl/method=dpo")
    assert logged(log, "dpo_loss")[0] == pytest.approx(math.log(2), abs=1e-4)  # logged to 4 digits
    assert logged(log, "reward_margin") and changed_from_start(run_dir)

    prefs = tmp_path / "prefs"
    prefs.mkdir()
    for split in ("train", "test"):
        (prefs / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    offline = ["rl/method=dpo", f"rl.method.offline.dataset={prefs}", "rl.method.offline.eval_split=test"]
    run_dir, log = run_rl_tiny(tmp_path, "offline", *offline, "rl.eval_prompts=0", "optim.lr=3e-3")
    accuracy = logged(log, "heldout_pref_accuracy")
    assert accuracy[0] == 0 and accuracy[-1] > 0.5  # at the start every margin is 0; after 3 updates > 50%
    assert logged(log, "heldout_reward_margin")[-1] > 0
