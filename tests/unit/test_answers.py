"""Answer extraction on real-looking outputs, equivalence, majority vote and pass@k against hand-worked values."""

from __future__ import annotations

import math

import pytest

from answers import (
    extract_answer,
    extract_boxed,
    grade_samples,
    is_equivalent,
    majority_vote,
    normalize_answer,
    pass_at_k,
    summarize_grades,
)

OUTPUTS = [
    # GSM8K reference and model outputs
    (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72",
        "72",
    ),
    ("She pays 3 * $1,250 = $3,750 in total.\n#### 3,750", "3750"),
    ("The total is 12.50 + 2.50 = 15.00\n#### 15.00", "15"),
    ("#### $18", "18"),
    ("He has 5 + 3 = 8 apples.\n#### 8 apples", "8"),
    ("Balance: -4\n#### -4", "-4"),
    # MATH-style boxed answers, nested braces, the last box wins
    ("We get $x = \\frac{1}{2}$, so the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    (
        "First \\boxed{3}, but correcting: \\boxed{\\sqrt{2^{3}} + \\frac{a}{b_{1}}}",
        "\\sqrt{2^{3}} + \\frac{a}{b_{1}}",
    ),
    ("The area is $\\boxed{12\\text{ cm}^2}$", "12\\text{ cm}^2"),
    ("Final: \\boxed{1,000}", "1000"),
    # S1K thinking mode: the Attempt section decides, not numbers in the reasoning
    (
        "Thinking: Try 7 first, then 11; maybe \\boxed{11}?\n\nAttempt: The smallest such prime is 13.",
        "13",
    ),
    ("Thinking: 2 + 2 = 4, and 4 * 3 = 12.\n\nAttempt: Therefore $\\boxed{12}$.", "12"),
    # last-number fallback
    ("So there are 4 boxes with 6 eggs each, giving 24 eggs.", "24"),
    ("It costs 0.5 dollars.", "0.5"),
    ("3/4 of the class passed", "3/4"),
    # no answer
    ("I am not sure how to solve this.", None),
    ("", None),
    ("\\boxed{unclosed", None),
]


@pytest.mark.parametrize(("text", "expected"), OUTPUTS)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_boxed_nested_and_fbox():
    assert extract_boxed("a \\boxed{\\frac{\\sqrt{3}}{2}} b") == "\\frac{\\sqrt{3}}{2}"
    assert extract_boxed("\\fbox{7}") == "7"
    assert extract_boxed("no box") is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1,234", "1234"), ("$5", "5"), ("5.0", "5"), ("2.50", "2.5"), ("  42. ", "42"), ("\\$3", "3"), ("50%", "50"),
     ("\\text{Paris}", "Paris"), ("\\left( 1, 2 \\right)", "( 1, 2 )")],
)  # fmt: skip
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "same"),
    [
        ("72", "72", True),
        ("1,000", "1000.0", True),
        ("0.5", "\\frac{1}{2}", True),  # math-verify
        ("\\frac{2}{4}", "\\frac{1}{2}", True),
        ("2^{1/2}", "\\sqrt{2}", True),
        ("3/4", "0.75", True),
        ("71", "72", False),
        ("\\frac{1}{3}", "\\frac{1}{2}", False),
        (None, "72", False),
        ("72", None, False),
    ],
)
def test_is_equivalent(prediction, reference, same):
    assert is_equivalent(prediction, reference) is same


def test_majority_vote():
    assert majority_vote(["5", "6", "6.0", "5", "6"]) == "6"  # "6.0" counts as "6"
    assert majority_vote(["5", "6", "6", "5"]) == "5"  # tie: the answer seen first
    assert majority_vote([None, "7", None]) == "7"  # missing answers do not vote
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_pass_at_k_hand_worked():
    # n=5, c=2: pass@1 = c/n; pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 2, 4) == 1.0  # n - c < k: some draw of 4 always holds a correct one
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(3, 4, 1)


def test_grade_and_summarize():
    first = grade_samples(["... #### 5", "so \\boxed{6}", "the answer is 5."], reference="5", ks=(1, 2))
    assert first.answers == ["5", "6", "5"]
    assert first.correct == [True, False, True]
    assert (first.majority, first.majority_correct) == ("5", True)
    assert first.pass_at == {1: pytest.approx(2 / 3), 2: 1.0}
    second = grade_samples(["no idea", "#### 4", "#### 4"], reference="5", ks=(1, 2))
    assert second.correct == [False, False, False] and second.majority == "4"
    summary = summarize_grades([first, second])
    assert summary["examples"] == 2
    assert summary["accuracy"] == 0.5
    assert summary["sample_accuracy"] == pytest.approx(2 / 6)
    assert summary["answered"] == pytest.approx(5 / 6)
    assert summary["pass@1"] == pytest.approx(1 / 3)
    assert summary["pass@2"] == pytest.approx(0.5)
