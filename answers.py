"""Final answers of math-style outputs: extraction, normalisation, equivalence, majority vote and pass@k.

Plain functions on strings, shared by evaluate.py (accuracy) and the RL rewards:

    extract_answer("... so she has 72 clips.\\n#### 72")  -> "72"
    extract_answer("Thus $x = \\boxed{\\frac{1}{2}}$.")     -> "\\frac{1}{2}"
    is_equivalent("1,000.0", "1000")                        -> True
    grade_samples(["#### 5", "#### 6", "#### 5"], "5")      -> majority "5", pass@k ...

Extraction looks, in order, for the GSM8K marker (`#### N`), then inside the `Attempt:` section of a
thinking-mode answer (`Thinking: ...\\n\\nAttempt: ...`) when there is one, the last `\\boxed{...}` (nested braces
allowed), then the last number. Equivalence compares normalised strings, then numbers, then LaTeX expressions
with `math-verify`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "extract_answer",
    "extract_boxed",
    "normalize_answer",
    "is_equivalent",
    "majority_vote",
    "pass_at_k",
    "SampleGrades",
    "grade_samples",
    "summarize_grades",
]

_GSM8K_MARKER = re.compile(r"####\s*([^\n]*)")
_ATTEMPT = re.compile(r"\bAttempt:")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# Numbers as written in answers: 1,234.5 (thousands separators), 3/4, -2, .5; the last one is the fallback.
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_LEADING_NUMBER = re.compile(r"\s*\\?\$?\s*(" + _NUMBER.pattern + r")(?=\s|$|[.,;!?](?:\s|$))")
_PLAIN_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)")
_LATEX_WRAPPERS = (r"\left", r"\right", r"\!", r"\,", r"\;", r"\displaystyle")


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, with nested braces; None if none closes."""
    found = None
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    found = text[start:i]
                    break
    return found.strip() if found is not None else None


def extract_answer(text: str) -> str | None:
    """The final answer of a model output or a dataset solution, normalised; None when there is none.

    Order: `#### N` (GSM8K); else the last `\\boxed{...}`; else the last number -- the last two searched in the
    `Attempt:` section when the text has one. A LaTeX answer without a box and without digits is not found.
    """
    if not text:
        return None
    marker = _GSM8K_MARKER.search(text)
    if marker is not None and marker.group(1).strip():
        answer = normalize_answer(marker.group(1))
        leading = _LEADING_NUMBER.match(marker.group(1))
        if _as_number(answer) is None and leading is not None:  # "#### 5 apples" -> "5"
            return normalize_answer(leading.group(1))
        return answer
    attempts = list(_ATTEMPT.finditer(text))
    if attempts:
        text = text[attempts[-1].end() :]
    boxed = extract_boxed(text)
    if boxed:
        return normalize_answer(boxed)
    numbers = _NUMBER.findall(text)
    return normalize_answer(numbers[-1]) if numbers else None


def normalize_answer(answer: str) -> str:
    """Canonical text of an answer: no `$`, spacing macros, `\\text{}` wrapper or trailing period; numbers
    without thousands separators and without a zero fraction ("1,000.0" -> "1000", "2.50" -> "2.5")."""
    text = answer.strip()
    for wrapper in _LATEX_WRAPPERS:
        text = text.replace(wrapper, "")
    text = text.replace("\\$", "").replace("$", "").strip()
    text = re.sub(r"^\\text\{(.*)\}$", r"\1", text).strip()
    text = text.rstrip(".").strip()
    number = text.replace(",", "")
    if number.endswith("%"):
        number = number[:-1]
    if _PLAIN_NUMBER.fullmatch(number):
        value = float(number)
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(value)
    return text


def _as_number(answer: str) -> float | None:
    if _PLAIN_NUMBER.fullmatch(answer):
        return float(answer)
    fraction = re.fullmatch(r"(-?\d+)/(\d+)", answer)
    if fraction and int(fraction.group(2)) != 0:
        return int(fraction.group(1)) / int(fraction.group(2))
    return None


def _latex(answer: str) -> str:
    return answer if "$" in answer else f"${answer}$"


def is_equivalent(prediction: str | None, reference: str | None) -> bool:
    """True when two answers mean the same: equal after `normalize_answer`, equal as numbers (relative
    tolerance 1e-6), or equivalent LaTeX/expressions according to `math_verify.verify`."""
    if prediction is None or reference is None:
        return False
    pred, ref = normalize_answer(prediction), normalize_answer(reference)
    if pred == ref:
        return True
    pred_number, ref_number = _as_number(pred), _as_number(ref)
    if pred_number is not None and ref_number is not None:
        return math.isclose(pred_number, ref_number, rel_tol=1e-6, abs_tol=1e-9)
    from math_verify import parse, verify

    gold, target = parse(_latex(ref)), parse(_latex(pred))
    return bool(gold) and bool(target) and verify(gold, target)


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent non-None answer (compared after `normalize_answer`); ties go to the one seen first."""
    normalized = [normalize_answer(a) for a in answers if a is not None]
    if not normalized:
        return None
    counts = Counter(normalized)
    return max(counts, key=lambda a: (counts[a], -normalized.index(a)))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` are correct (Chen et al., 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got n={n}, c={c}.")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n={n} samples; draw more samples or lower k.")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass
class SampleGrades:
    """Grades of the k samples of one question: extracted answers, correct flags, majority answer and pass@k."""

    answers: list[str | None]
    correct: list[bool]
    majority: str | None
    majority_correct: bool
    pass_at: dict[int, float]


def grade_samples(texts: Sequence[str], reference: str | None, ks: Sequence[int] = (1,)) -> SampleGrades:
    """Extract and grade every sample of one question against the (already extracted) `reference`.

    `ks` lists the k of pass@k (each at most `len(texts)`).
    """
    answers = [extract_answer(t) for t in texts]
    correct = [is_equivalent(a, reference) for a in answers]
    majority = majority_vote(answers)
    return SampleGrades(
        answers=answers,
        correct=correct,
        majority=majority,
        majority_correct=is_equivalent(majority, reference),
        pass_at={k: pass_at_k(len(texts), sum(correct), k) for k in ks},
    )


def summarize_grades(grades: Sequence[SampleGrades]) -> dict[str, float]:
    """Dataset-level metrics: `accuracy` (majority answer correct), `sample_accuracy` (mean over all samples),
    `pass@k` (mean of the unbiased estimates) and `answered` (share of samples with an extracted answer)."""
    if not grades:
        raise ValueError("No graded examples to summarize.")
    samples = [ok for g in grades for ok in g.correct]
    summary = {
        "examples": len(grades),
        "accuracy": sum(g.majority_correct for g in grades) / len(grades),
        "sample_accuracy": sum(samples) / len(samples),
        "answered": sum(a is not None for g in grades for a in g.answers) / len(samples),
    }
    for k in grades[0].pass_at:
        summary[f"pass@{k}"] = sum(g.pass_at[k] for g in grades) / len(grades)
    return summary
