"""Reward functions (rl/rewards.py) on a table of real-looking completions: right, wrong, malformed, empty."""

from __future__ import annotations

import sys
import textwrap

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from rl.rewards import (
    WeightedSum,
    answer_follows_work,
    build_reward,
    checked_arithmetic,
    consistent_arithmetic,
    equations_hold,
    exact_match,
    format_reward,
    length_penalty,
    load_reward,
    math_verify_match,
    score,
)

GSM8K_REFERENCE = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"

# (completion, reference, exact_match reward)
EXACT_MATCH_TABLE = [
    ("48 + 24 = 72\n#### 72", GSM8K_REFERENCE, 1.0),  # GSM8K marker, right
    ("48 + 24 = 71\n#### 71", GSM8K_REFERENCE, 0.0),  # GSM8K marker, wrong
    ("She sold 24 in May, 72 in all.\n#### 72 clips", "#### 72", 1.0),  # unit after the number
    ("#### 1,250.00", "#### 1250", 1.0),  # thousands separator and zero fraction
    ("So the answer is $\\boxed{72}$.", "#### 72", 1.0),  # boxed
    ("So the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", 1.0),  # boxed LaTeX vs a LaTeX column
    ("Half of it: \\boxed{0.5}", "#### 1/2", 1.0),  # exact numbers: 0.5 == 1/2
    ("Thinking: 3 + 4 is 7, minus 2.\n\nAttempt: The answer is 5.", "5", 1.0),  # Attempt section decides
    ("Thinking: maybe 5?\n\nAttempt: It is 7.", "5", 0.0),  # a number in the reasoning does not count
    ("12 + 75 = 87", "12 + 75 = 87\n#### 87", 1.0),  # last number, no marker
    ("12 + 75 = 87 apples, I think 88", "#### 87", 0.0),  # last number is wrong
    ("I don't know.", "#### 87", 0.0),  # malformed: no answer at all
    ("####", "#### 87", 0.0),  # malformed: empty marker
    ("", "#### 87", 0.0),  # empty completion
    ("#### 87", None, 0.0),  # no reference
]


@pytest.mark.parametrize(("completion", "reference", "expected"), EXACT_MATCH_TABLE)
def test_exact_match_table(completion, reference, expected):
    assert exact_match(["q"], [completion], answer=[reference]) == [expected]


def test_strict_exact_match_needs_a_marked_answer():
    completions = ["12 + 75 = 87", "+ 3 9 = 87", "so #### 87", "\\boxed{87}", "#### 86"]
    assert exact_match(["q"] * 5, completions, answer=["#### 87"] * 5) == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert exact_match(["q"] * 5, completions, strict=True, answer=["#### 87"] * 5) == [
        0.0,
        0.0,
        1.0,
        1.0,
        0.0,
    ]


def test_exact_match_reads_the_configured_reference_field():
    rewards = exact_match(["q", "q"], ["#### 3", "#### 4"], reference_field="solution", solution=["3", "3"])
    assert rewards == [1.0, 0.0]


def test_missing_reference_field_names_the_fix():
    with pytest.raises(
        ValueError, match=r"reference answers in the dataset column 'answer'.*rl.answer_field"
    ):
        exact_match(["q"], ["#### 3"], solution=["3"])


@pytest.mark.parametrize(
    ("completion", "reference", "expected"),
    [
        ("$\\frac{1}{2}$", "0.5", 1.0),
        ("The answer is \\boxed{\\sqrt{4}}", "#### 2", 1.0),
        ("\\boxed{x^2 + 2x + 1}", "\\boxed{(x+1)^2}", 1.0),
        ("\\boxed{3}", "\\frac{1}{2}", 0.0),
        ("", "0.5", 0.0),
    ],
)
def test_math_verify_equivalence(completion, reference, expected):
    assert math_verify_match(["q"], [completion], answer=[reference]) == [expected]


GSM8K_LINE = r"####\s*-?[\d,.]+\s*$"


@pytest.mark.parametrize(
    ("completion", "pattern", "kwargs", "expected"),
    [
        ("12 + 75 = 87\n#### 87", GSM8K_LINE, {}, 1.0),
        ("12 + 75 = 87\n#### 87\nmore text", GSM8K_LINE, {}, 0.0),  # `$` is the end of the text
        ("12 + 75 = 87\n#### 87\nmore text", GSM8K_LINE, {"flags": "m"}, 1.0),  # ... or of a line
        ("#### eighty-seven", GSM8K_LINE, {}, 0.0),
        ("", GSM8K_LINE, {}, 0.0),
        ("  ANSWER: 5  ", r"answer: \d+", {"mode": "fullmatch", "flags": "i"}, 1.0),
        ("ANSWER: 5 apples", r"answer: \d+", {"mode": "fullmatch", "flags": "i"}, 0.0),
    ],
)
def test_format_reward(completion, pattern, kwargs, expected):
    assert format_reward(["q"], [completion], pattern=pattern, **kwargs) == [expected]


def test_format_reward_rejects_unknown_mode_and_flags():
    with pytest.raises(ValueError, match="choose one of"):
        format_reward(["q"], ["x"], pattern="x", mode="match")
    with pytest.raises(ValueError, match=r"unknown \['x'\]"):
        format_reward(["q"], ["x"], pattern="x", flags="ix")


def test_length_penalty_is_zero_to_target_then_linear():
    completions = ["", "one two three four", "w " * 6, "w " * 8]
    assert length_penalty(["q"] * 4, completions, target=4) == [0.0, 0.0, -0.5, -1.0]
    assert length_penalty(["q"], ["abcdef"], target=4, unit="chars", scale=2.0) == [-1.0]
    with pytest.raises(ValueError, match="choose one of"):
        length_penalty(["q"], ["x"], target=4, unit="tokens")


def test_weighted_sum_and_its_components():
    reward = WeightedSum(
        {
            "correct": lambda p, c, **f: exact_match(p, c, **f),
            "format": lambda p, c, **f: format_reward(p, c, pattern=GSM8K_LINE),
        },
        weights={"format": 0.1},
    )
    completions = ["5 + 3 = 8\n#### 8", "#### 9", "it is 8"]
    fields = {"answer": ["#### 8"] * 3}
    assert reward(["q"] * 3, completions, **fields) == pytest.approx([1.1, 0.1, 1.0])
    scores = score(reward, ["q"] * 3, completions, fields)
    assert scores.total == pytest.approx([1.1, 0.1, 1.0])
    assert scores.components == {"correct": [1.0, 0.0, 1.0], "format": [1.0, 1.0, 0.0]}
    with pytest.raises(ValueError, match=r"names \['style'\], which are not in reward.rewards"):
        WeightedSum({"correct": exact_match}, weights={"style": 1.0})


@pytest.mark.parametrize(
    ("completion", "reference", "expected"),
    [
        ("5 + 3 = 8\n#### 8", "#### 8", 1.0),  # right work, right answer
        ("5 + 4 = 10\n#### 8", "#### 8", 0.0),  # right number after wrong work
        ("5 + 4 = 9\n#### 9", "#### 8", 0.0),  # true work, wrong answer
        ("7 + = = 10\n#### 10", "#### 10", 0.0),  # malformed equation
        ("#### 8", "#### 8", 1.0),  # no work shown: nothing to contradict the answer
        ("so it is 8", "#### 8", 0.0),  # no marked answer (strict: no last-number fallback)
        ("", "#### 8", 0.0),  # empty
        ("9 + 6 = 15\n15 - 7 = 8\n#### 8", "#### 8", 1.0),  # two steps
        ("9 + 6 = 15\n15 - 7 = 9\n#### 8", "#### 8", 0.0),  # the second step is false
        (GSM8K_REFERENCE, GSM8K_REFERENCE, 1.0),  # GSM8K's <<48/2=24>> annotation (and 48/2 = <<...)
        ("Natalia sold <<48/2=25>>25 clips.\n#### 72", GSM8K_REFERENCE, 0.0),
        ("3 * 4 = 12\n#### 12", "#### 12", 1.0),
        ("2 x 6 = 12\n#### 12", "#### 12", 1.0),
        ("1,000 + 5 = 1,005\n#### 1005", "#### 1005", 1.0),
        ("10 / 4 = 2.5\n#### 2.5", "#### 2.5", 1.0),
    ],
)
def test_checked_arithmetic_table(completion, reference, expected):
    assert checked_arithmetic(["q"], [completion], answer=[reference]) == [expected]


def test_consistent_arithmetic_needs_no_reference():
    completions = [
        "5 + 3 = 8\n#### 8",  # true work, its own result
        "5 + 4 = 10\n#### 10",  # false work
        "5 + 4 = 9\n#### 8",  # true work, another answer
        "9 + 6 = 15\n15 - 7 = 8\n#### 8",  # two steps
        "#### 8",  # no work to check
        "",
    ]
    assert consistent_arithmetic(["q"] * 6, completions) == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert build_reward("consistent_arithmetic")(["q"], completions[:1]) == [1.0]
    # the answer follows the work (true or false) in the first two and the two-step one only
    assert [answer_follows_work(c) for c in completions] == [True, True, False, True, False, False]


def test_equations_hold_evaluates_plain_arithmetic_only():
    assert equations_hold("3 - 5 = -2 and 2 * (3 + 1) = 8")
    assert not equations_hold("2 * (3 + 1) = 7")
    assert not equations_hold("1 / 0 = 1")
    assert equations_hold("no equation here")
    # names and calls are not evaluated: only the arithmetic part next to "=" is read
    assert equations_hold("__import__('os') 2 + 2 = 4")


def test_checked_arithmetic_config_and_build_reward():
    cfg = OmegaConf.merge(
        {"rl": {"answer_field": "answer"}},
        {"reward": OmegaConf.load("configs/reward/checked_arithmetic.yaml")},
    )
    completions = ["2 + 2 = 4\n#### 4", "2 + 2 = 5\n#### 4"]
    assert instantiate(cfg.reward)(["q", "q"], completions, answer=["4", "4"]) == [1.0, 0.0]
    assert build_reward("checked_arithmetic")(["q", "q"], completions, answer=["4", "4"]) == [1.0, 0.0]


def test_weighted_config_instantiates_with_hydra():
    cfg = OmegaConf.load("configs/reward/weighted.yaml")
    cfg = OmegaConf.merge({"rl": {"answer_field": "answer"}}, {"reward": cfg})
    reward = instantiate(cfg.reward)
    assert reward(["q", "q"], ["#### 8", "8"], answer=["8", "8"]) == pytest.approx([1.1, 1.0])


def test_score_checks_the_output_of_a_reward():
    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        score(lambda p, c, **f: [1.0], ["q", "q"], ["a", "b"], {})
    with pytest.raises(ValueError, match="non-finite values"):
        score(lambda p, c, **f: [1.0, float("nan")], ["q", "q"], ["a", "b"], {})
    with pytest.raises(ValueError, match="one entry per completion"):
        score(exact_match, ["q"], ["a", "b"], {"answer": ["1", "2"]})


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's reward module on the import path."""
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            def brevity(prompts, completions, target=3, **fields):
                return [float(len(c.split()) <= target) for c in completions]

            class Contains:
                def __init__(self, word):
                    self.word = word

                def __call__(self, prompts, completions, **fields):
                    return [float(self.word in c) for c in completions]

            NOT_CALLABLE = 3
            """
        ),
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_custom_reward_by_import_path(user_module):
    brevity = load_reward("my_rewards.brevity", target=2)
    assert brevity(["q", "q"], ["a b", "a b c"]) == [1.0, 0.0]
    contains = load_reward("my_rewards:Contains", word="####")
    assert contains(["q", "q"], ["#### 1", "1"]) == [1.0, 0.0]
    assert build_reward("my_rewards.brevity")(["q"], ["a b c d"]) == [0.0]
    cfg = OmegaConf.create({"_target_": "rl.rewards.load_reward", "path": "my_rewards.brevity", "target": 1})
    assert instantiate(cfg)(["q", "q"], ["a", "a b"]) == [1.0, 0.0]


def test_custom_reward_errors_name_the_fix(user_module):
    with pytest.raises(ImportError, match="Put the module on PYTHONPATH"):
        load_reward("no_such_module.fn")
    with pytest.raises(AttributeError, match="has no 'missing'"):
        load_reward("my_rewards.missing")
    with pytest.raises(TypeError, match="not a function"):
        load_reward("my_rewards.NOT_CALLABLE")
    with pytest.raises(ValueError, match="package.module.function"):
        load_reward("brevity")
    with pytest.raises(ValueError, match="Unknown reward 'exactmatch'; choose one of"):
        build_reward("exactmatch")


def test_build_reward_by_name():
    assert build_reward("exact_match")(["q"], ["#### 4"], answer=["4"]) == [1.0]
    assert build_reward("format", pattern="^#")(["q", "q"], ["#1", "1"]) == [1.0, 0.0]


def save_tiny_classifier(directory, num_labels: int):
    """A one-layer GPT-2 sequence classifier with the GPT-2 tokenizer, saved like any HF reward model."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from tokenizer import get_tokenizer

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50257, n_positions=64, n_embd=16, n_layer=1, n_head=2, num_labels=num_labels
    )
    model = GPT2ForSequenceClassification(config)
    model.config.pad_token_id = 50256
    model.save_pretrained(directory)
    get_tokenizer().save_pretrained(directory)
    return model


@pytest.mark.parametrize("num_labels", [1, 3])
def test_reward_model_scores_like_the_classifier(tmp_path, num_labels):
    import torch

    from rl.rewards import RewardModel
    from tokenizer import get_tokenizer

    model = save_tiny_classifier(tmp_path, num_labels).eval()
    reward = RewardModel(str(tmp_path), batch_size=2, template="Q: {prompt}\nA: {completion}")
    prompts, completions = ["What is 2 + 3?"] * 3, ["#### 5", "It is five.", ""]
    values = reward(prompts, completions)
    tokenizer = get_tokenizer()
    expected = []
    for p, c in zip(prompts, completions, strict=True):
        with torch.no_grad():
            logits = model(**tokenizer(f"Q: {p}\nA: {c}", return_tensors="pt")).logits[0]
        expected.append(float(logits[0] if num_labels == 1 else logits.softmax(-1)[-1]))
    assert values == pytest.approx(expected, abs=1e-5)


def test_reward_model_missing_directory_names_the_fix(tmp_path):
    from rl.rewards import RewardModel

    with pytest.raises(FileNotFoundError, match=r"Save one with model.save_pretrained\(dir\)"):
        RewardModel(str(tmp_path / "nowhere"))
