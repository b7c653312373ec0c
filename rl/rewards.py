"""Reward functions: plain functions with one interface, chosen in configs/reward/*.yaml with `_target_`.

    reward(prompts: list[str], completions: list[str], **fields) -> list[float]

`prompts[i]` is the question the i-th completion answers (the dataset's question column, before the prompt
template), `completions[i]` the generated answer cut at EOS, and `fields` holds the dataset's other columns
aligned with the completions (`fields["answer"][i]` is the reference of completion i). A reward returns one
finite float per completion and ignores the fields it does not use (`**fields`).

Built in: `exact_match` (final answer `#### N`, `\\boxed{}`, `Attempt:` or last number equals the reference's),
`math_verify_match` (LaTeX equivalence with math-verify), `checked_arithmetic` (a right final answer whose
worked equations are all true), `consistent_arithmetic` (true work ending in its own result, no reference
needed), `format_reward` (regex), `length_penalty`,
`RewardModel` (a HuggingFace sequence classifier) and `WeightedSum` (a weighted sum of rewards). Your own
function plugs in by import path: `reward=custom reward.path=my_package.my_module.my_reward`
(or `reward._target_=my_package.my_module.my_reward +reward._partial_=true`).
"""

from __future__ import annotations

import ast
import importlib
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from answers import extract_answer, is_equivalent, normalize_answer

__all__ = [
    "RewardFn",
    "Scores",
    "exact_match",
    "math_verify_match",
    "checked_arithmetic",
    "consistent_arithmetic",
    "format_reward",
    "length_penalty",
    "RewardModel",
    "WeightedSum",
    "load_reward",
    "build_reward",
    "reference_answer",
    "score",
]


class RewardFn(Protocol):
    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> list[float]: ...


_ANSWER_MARKERS = ("####", "\\boxed", "\\fbox", "Attempt:")
_STRICT_MARKERS = ("####", "\\boxed", "\\fbox")


def reference_answer(reference: Any) -> str | None:
    """The final answer of a reference field: extracted like a completion's when it holds a marker
    (`#### N`, `\\boxed{}`, `Attempt:`) or no LaTeX, else the whole (normalised) text, so that a plain
    `\\frac{1}{2}` column is not read as its last number `2`."""
    if reference is None:
        return None
    text = str(reference)
    if any(marker in text for marker in _ANSWER_MARKERS) or "\\" not in text:
        return extract_answer(text)
    return normalize_answer(text) or None


def _number(answer: str) -> Fraction | None:
    """`answer` (already normalised) as an exact number: integers, decimals and a/b fractions."""
    try:
        return Fraction(answer)
    except (ValueError, ZeroDivisionError):
        return None


def _references(fields: Mapping[str, Any], reference_field: str, n: int, reward: str) -> list[Any]:
    if reference_field not in fields:
        raise ValueError(
            f"The {reward} reward needs the reference answers in the dataset column {reference_field!r}, but the "
            f"fields are {sorted(fields)}. Set reward.reference_field (rl.answer_field) to the answer column."
        )
    references = list(fields[reference_field])
    if len(references) != n:
        raise ValueError(f"{len(references)} references for {n} completions; pass one per completion.")
    return references


def answers_match(prediction: str | None, reference: str | None) -> bool:
    """Exact match of two extracted answers: equal after `normalize_answer`, or equal as numbers."""
    if prediction is None or reference is None:
        return False
    pred, ref = normalize_answer(prediction), normalize_answer(reference)
    if pred == ref:
        return True
    a, b = _number(pred), _number(ref)
    return a is not None and b is not None and a == b


def exact_match(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    reference_field: str = "answer",
    strict: bool = False,
    **fields: Any,
) -> list[float]:
    """1.0 when the completion's final answer equals the reference's, else 0.0 (no answer: 0.0).

    Answers are extracted with `answers.extract_answer` (`#### N`, then `\\boxed{}` / the `Attempt:` section,
    then the last number) and compared as normalised strings or exact numbers (`1,000.0` == `1000`, `0.5`
    == `1/2`). No LaTeX parsing: see `math_verify_match` for that. `strict`: only an answer stated with a
    marker (`#### N`, `\\boxed{}`) counts, not the last-number fallback, so that RL does not reward (and
    train on) a jumble of numbers whose last one happens to be right.
    """
    references = _references(fields, reference_field, len(completions), "exact_match")
    return [
        float(
            (not strict or any(m in c for m in _STRICT_MARKERS))
            and answers_match(extract_answer(c), reference_answer(r))
        )
        for c, r in zip(completions, references, strict=True)
    ]


# an equation of plain arithmetic: numbers, + - * / x and brackets, "=", a number (GSM8K's <<48/2=24>> too)
_EQUATION_RE = re.compile(r"((?:[-(]\s*)*\d[-+*/x×()\d.,\s]*)=\s*(-?[\d,]*\.?\d+)")
_DANGLING_RE = re.compile(
    r"[-+*/×]\s*=|=\s*="
)  # "4 + = 12", "= = 10": an operator or "=" missing its operand
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _arithmetic(node: ast.AST) -> Fraction:
    """The exact value of a parsed expression of numbers, + - * / and unary minus (nothing else is allowed)."""
    if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, int | float)
        and not isinstance(node.value, bool)
    ):
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _arithmetic(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_arithmetic(node.left), _arithmetic(node.right))
    raise ValueError("not plain arithmetic")


def equations_hold(text: str) -> bool:
    """True when every equation `expr = number` in `text` (`3 + 5 = 8`, `<<48/2=24>>`) is true arithmetic.
    Text with no equation holds trivially; a dangling operator (`4 + = 12`) or an expression that does not
    parse is false."""
    if _DANGLING_RE.search(text):
        return False
    for expression, result in _EQUATION_RE.findall(text):
        expression = expression.replace(",", "").replace("×", "*").replace("x", "*").strip()
        if not expression or expression[-1] in "+-*/":
            return False
        try:
            if _arithmetic(ast.parse(expression, mode="eval").body) != Fraction(result.replace(",", "")):
                return False
        except (SyntaxError, ValueError, ZeroDivisionError):
            return False
    return True


def checked_arithmetic(
    prompts: Sequence[str], completions: Sequence[str], *, reference_field: str = "answer", **fields: Any
) -> list[float]:
    """1.0 when the final answer (`#### N` or `\\boxed{}`) equals the reference's and every worked equation
    of the completion is true (`equations_hold`), else 0.0: a process check for GSM8K-style answers, so that RL
    does not reward (and train on) `5 + 4 = 10 #### 8`, a right number after wrong work."""
    right = exact_match(prompts, completions, reference_field=reference_field, strict=True, **fields)
    return [
        float(r == 1.0 and equations_hold(c.split("####")[0]))
        for r, c in zip(right, completions, strict=True)
    ]


def answer_follows_work(completion: str) -> bool:
    """True when the completion's `#### N` answer is the right-hand side of its last worked equation, whether
    or not that equation is true (`3 + 5 = 9\n#### 9` follows its work; `3 + 5 = 8\n#### 9` does not)."""
    work, _, final = completion.partition("####")
    equations = _EQUATION_RE.findall(work)
    return bool(equations) and answers_match(final.strip() or None, equations[-1][1].replace(",", ""))


def consistent_arithmetic(prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> list[float]:
    """1.0 when the completion shows work whose equations are all true and its `#### N` answer is the result
    of the last equation, else 0.0. Needs no reference answer: a verifier a policy can be steered or trained
    with on unlabelled prompts (the answer can still be wrong if the work used the wrong numbers)."""
    return [float(answer_follows_work(c) and equations_hold(c.partition("####")[0])) for c in completions]


def math_verify_match(
    prompts: Sequence[str], completions: Sequence[str], *, reference_field: str = "answer", **fields: Any
) -> list[float]:
    """1.0 when the completion's answer is mathematically equivalent to the reference's (math-verify).

    First `answers.is_equivalent` on the extracted answers (strings, numbers, then math-verify on the two
    expressions); failing that, math-verify's own extraction over the whole completion (`$...$`, `\\boxed{}`)
    against the reference answer, so `$\\frac{1}{2}$` matches `0.5` and `\\boxed{\\sqrt{4}}` matches `2`.
    """
    from math_verify import parse, verify

    references = _references(fields, reference_field, len(completions), "math_verify_match")
    rewards = []
    for completion, reference in zip(completions, references, strict=True):
        ref = reference_answer(reference)
        ok = is_equivalent(extract_answer(completion), ref)
        if not ok and ref is not None and completion.strip():
            gold = parse(ref if "$" in ref else f"${ref}$")
            ok = bool(gold) and verify(gold, parse(completion))
        rewards.append(float(ok))
    return rewards


_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL}


def format_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    pattern: str,
    mode: str = "search",
    flags: str = "",
    **fields: Any,
) -> list[float]:
    """1.0 when the completion matches the regular expression `pattern`, else 0.0.

    `mode`: `search` (anywhere) or `fullmatch` (the whole completion, surrounding whitespace stripped);
    `flags`: any of `i` (ignore case), `m` (multiline), `s` (dot matches newline).
    """
    modes = {"search": re.search, "fullmatch": re.fullmatch}
    if mode not in modes:
        raise ValueError(f"format_reward mode={mode!r} is not valid; choose one of {sorted(modes)}.")
    unknown = set(flags) - set(_FLAGS)
    if unknown:
        raise ValueError(
            f"format_reward flags={flags!r}: unknown {sorted(unknown)}; use any of {sorted(_FLAGS)}."
        )
    compiled = re.compile(pattern, sum((_FLAGS[f] for f in set(flags)), 0))
    match = modes[mode]
    return [float(match(compiled, c.strip() if mode == "fullmatch" else c) is not None) for c in completions]


def length_penalty(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    target: int,
    unit: str = "words",
    scale: float = 1.0,
    **fields: Any,
) -> list[float]:
    """`-scale * max(0, n - target) / target`: 0 up to `target` units, then linearly negative (-scale at
    twice the target). `n` counts `words` (whitespace-separated) or `chars` of the completion."""
    units: dict[str, Callable[[str], int]] = {"words": lambda c: len(c.split()), "chars": len}
    if unit not in units:
        raise ValueError(f"length_penalty unit={unit!r} is not valid; choose one of {sorted(units)}.")
    if target < 1:
        raise ValueError(f"length_penalty target={target} must be at least 1.")
    count = units[unit]
    return [-scale * max(0, count(c) - target) / target + 0.0 for c in completions]  # + 0.0: no -0.0


class RewardModel:
    """Scores (prompt, completion) with a HuggingFace sequence-classification model
    (`AutoModelForSequenceClassification`, e.g. a trained reward model saved with `save_pretrained`).

    The text scored is `template` with `{prompt}` and `{completion}` filled in. With one output label the
    reward is its logit; with several it is the probability of label `label` (default: the last label,
    conventionally "good"). `path` is a local directory, or a hub id that is already in the cache when
    HF_HUB_OFFLINE=1.
    """

    def __init__(
        self,
        path: str,
        *,
        device: str = "cpu",
        batch_size: int = 16,
        max_length: int = 512,
        template: str = "{prompt}\n{completion}",
        label: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path)
        except OSError as err:
            local = Path(path).expanduser()
            hint = (
                f"{local} exists but holds no loadable model (config.json, weights and tokenizer files)"
                if local.exists()
                else "it is neither a local directory nor a hub id in the cache (HF_HUB_OFFLINE=1 never downloads)"
            )
            raise FileNotFoundError(
                f"Cannot load the reward model {path!r}: {hint}. Save one with model.save_pretrained(dir) and "
                f"tokenizer.save_pretrained(dir), then set reward.path=dir. ({err})"
            ) from err
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        n_labels = self.model.config.num_labels
        if label is not None and not 0 <= label < n_labels:
            raise ValueError(f"reward label={label} but the model has {n_labels} labels (0..{n_labels - 1}).")
        self.label = n_labels - 1 if label is None else label
        self.n_labels = n_labels
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.batch_size, self.max_length, self.template = batch_size, max_length, template

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> list[float]:
        import torch

        texts = [
            self.template.replace("{prompt}", p).replace("{completion}", c)
            for p, c in zip(prompts, completions, strict=True)
        ]
        rewards: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            with torch.no_grad():
                logits = self.model(**enc).logits.float()
            values = logits[:, 0] if self.n_labels == 1 else logits.softmax(-1)[:, self.label]
            rewards.extend(values.tolist())
        return rewards


class WeightedSum:
    """`sum_n weights[n] * rewards[n](...)`, e.g. correctness plus a small format bonus. Missing weights are
    1.0. `components(...)` returns each reward's values (run_rl logs their means)."""

    def __init__(self, rewards: Mapping[str, RewardFn], weights: Mapping[str, float] | None = None) -> None:
        if not rewards:
            raise ValueError(
                "WeightedSum needs at least one reward (reward.rewards: {name: {_target_: ...}})."
            )
        weights = dict(weights or {})
        unknown = set(weights) - set(rewards)
        if unknown:
            raise ValueError(
                f"reward.weights names {sorted(unknown)}, which are not in reward.rewards {sorted(rewards)}."
            )
        self.rewards = dict(rewards)
        self.weights = {name: float(weights.get(name, 1.0)) for name in self.rewards}

    def components(
        self, prompts: Sequence[str], completions: Sequence[str], **fields: Any
    ) -> dict[str, list[float]]:
        return {
            name: check_rewards(fn(prompts, completions, **fields), len(completions), name)
            for name, fn in self.rewards.items()
        }

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> list[float]:
        parts = self.components(prompts, completions, **fields)
        return combine(parts, self.weights, len(completions))


def combine(parts: Mapping[str, Sequence[float]], weights: Mapping[str, float], n: int) -> list[float]:
    return [sum(weights[name] * values[i] for name, values in parts.items()) for i in range(n)]


def check_rewards(values: Any, n: int, name: str) -> list[float]:
    """`values` as a list of `n` finite floats, or a ValueError naming the reward."""
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"Reward {name} must return a list of floats, got {type(values).__name__}: {err}"
        ) from err
    if len(values) != n:
        raise ValueError(f"Reward {name} returned {len(values)} values for {n} completions; return one each.")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise ValueError(
            f"Reward {name} returned non-finite values (first at completion {bad[0]}: {values[bad[0]]})."
        )
    return values


def _reward_name(fn: Any) -> str:
    fn = getattr(fn, "func", fn)
    return getattr(fn, "__qualname__", type(fn).__name__)


@dataclass
class Scores:
    """Rewards of B x G completions: `total` [B x G] and, for a `WeightedSum`, each component's values."""

    total: list[float]
    components: dict[str, list[float]]


def score(
    reward_fn: RewardFn,
    prompts: Sequence[str],
    completions: Sequence[str],
    fields: Mapping[str, Sequence[Any]],
) -> Scores:
    """Call `reward_fn` and check its output (one finite float per completion)."""
    n = len(completions)
    if len(prompts) != n or any(len(v) != n for v in fields.values()):
        raise ValueError("prompts, completions and every field must have one entry per completion.")
    fields = {k: list(v) for k, v in fields.items()}
    if isinstance(reward_fn, WeightedSum):
        parts = reward_fn.components(prompts, completions, **fields)
        return Scores(combine(parts, reward_fn.weights, n), parts)
    return Scores(
        check_rewards(reward_fn(list(prompts), list(completions), **fields), n, _reward_name(reward_fn)), {}
    )


# ----------------------------------------------------------------------------- by name or import path
def load_reward(path: str, **kwargs: Any) -> RewardFn:
    """Your reward function (or class) by import path, `package.module.function` or `package.module:function`;
    `kwargs` are bound with functools.partial (a class is instantiated with them)."""
    module_name, sep, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(
            f"reward path {path!r} must look like 'package.module.function' (or 'package.module:function')."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(
            f"Cannot import {module_name!r} for reward {path!r}: {err}. Put the module on PYTHONPATH (run from "
            "the directory that contains it) or install its package."
        ) from err
    if not hasattr(module, attr):
        raise AttributeError(f"Module {module_name!r} has no {attr!r} (reward {path!r}).")
    target = getattr(module, attr)
    if isinstance(target, type):
        return target(**kwargs)
    if not callable(target):
        raise TypeError(f"Reward {path!r} is a {type(target).__name__}, not a function.")
    return partial(target, **kwargs) if kwargs else target


def build_reward(name: str, **kwargs: Any) -> RewardFn:
    """A built-in reward by name (for command-line tools), or any other name as an import path."""
    builtin: dict[str, Callable[..., Any]] = {
        "exact_match": exact_match,
        "checked_arithmetic": checked_arithmetic,
        "consistent_arithmetic": consistent_arithmetic,
        "math_verify": math_verify_match,
        "format": format_reward,
        "length": length_penalty,
        "reward_model": RewardModel,
    }
    if name in builtin:
        target = builtin[name]
        return target(**kwargs) if isinstance(target, type) else partial(target, **kwargs)
    if "." not in name and ":" not in name:
        raise ValueError(
            f"Unknown reward {name!r}; choose one of {sorted(builtin)} or give an import path (pkg.module.fn)."
        )
    return load_reward(name, **kwargs)
