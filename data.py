"""Datasets for SEDD: supervised fine-tuning (prompt/response with loss masks) and pretraining.

SFT pipeline (``build_sft_datasets`` runs all of it)::

    dsd = load_raw_dataset("simplescaling/s1K-1.1")        # hub name, local file/dir, or "demo/arithmetic"
    spec = resolve_fields(dsd["train"].column_names, ...)   # which columns are prompt / response
    train, valid = make_splits(dsd)                        # existing validation split or a seeded 5%
    train, report = tokenize_sft_dataset(train, spec, tok, max_length, PromptTemplate())
    loader = DataLoader(train, batch_size=bs, sampler=LengthGroupedSampler(train["length"], bs),
                        collate_fn=partial(sft_collate, pad_id=tok.pad_token_id))

One example is one sequence (no chunking): ``input_ids = prompt + response + [EOS]``, and only the
response and EOS positions are trained on (``loss_mask``/``labels`` built in ``sft_collate``).

Pretraining: ``load_text_corpus`` + ``pack_tokens`` give fixed-length blocks of a document stream
joined by EOS.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import numpy as np
import torch
from datasets import Dataset, DatasetDict
from datasets.exceptions import DatasetNotFoundError
from huggingface_hub.errors import RepositoryNotFoundError

__all__ = [
    "IGNORE_INDEX",
    "DEFAULT_TEXT_FIELD",
    "DEMO_DATASET",
    "DEMO_NOISY_DATASET",
    "FieldSpec",
    "PromptTemplate",
    "DataReport",
    "SFTData",
    "resolve_fields",
    "load_raw_dataset",
    "make_demo_arithmetic",
    "extract_final_answer",
    "make_splits",
    "tokenize_sft_dataset",
    "sft_collate",
    "LengthGroupedSampler",
    "build_sft_datasets",
    "load_text_corpus",
    "pack_tokens",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
DEFAULT_TEXT_FIELD = "text"
DEMO_DATASET = "demo/arithmetic"
# the same questions with 30% of the training answers off by one (work and final answer alike); test split clean
DEMO_NOISY_DATASET = "demo/arithmetic_noisy"

# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
_BUILDER_PREFERENCE = ["parquet", "json", "csv", "text"]
_SPLIT_WORDS = {
    "train": {"train", "training"},
    "validation": {"validation", "valid", "val", "dev"},
    "test": {"test", "testing", "eval"},
}
_COMPRESSION_SUFFIXES = {".gz", ".bz2", ".xz", ".zst"}
_LOCAL_FORMATS_HELP = (
    "a local path also works: a .json/.jsonl/.csv/.parquet/.txt file, a directory of such files "
    "(split names taken from file names, e.g. train.jsonl/test.jsonl), or a directory written by "
    "Dataset.save_to_disk / DatasetDict.save_to_disk"
)


def _builder_for(path: Path) -> str | None:
    """The ``datasets`` packaged builder for a local data file, or None if unsupported."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    return _LOCAL_BUILDERS.get(suffixes[-1]) if suffixes else None


def _looks_like_local_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~")) or Path(name).is_absolute() or _builder_for(Path(name)) is not None
    )


def _as_dataset_dict(loaded: Dataset | DatasetDict) -> DatasetDict:
    return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})


def _load_local(path: Path, cache_dir: str | None) -> DatasetDict:
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"The dataset file {path} is empty; it needs at least one example.")
    if path.is_file():
        builder = _builder_for(path)
        if builder is None:
            raise ValueError(
                f"Unsupported data file '{path}'; use .json, .jsonl, .csv, .parquet or .txt "
                "(optionally .gz/.bz2/.xz/.zst compressed)."
            )
        return _as_dataset_dict(
            datasets.load_dataset(builder, data_files={"train": str(path)}, cache_dir=cache_dir)
        )
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _as_dataset_dict(datasets.load_from_disk(str(path)))
    files = [
        p
        for p in sorted(path.rglob("*"))
        if p.is_file()
        and _builder_for(p) is not None
        and not any(part.startswith((".", "__")) for part in p.relative_to(path).parts)
    ]
    if not files:
        raise FileNotFoundError(f"Directory '{path}' holds no usable data: {_LOCAL_FORMATS_HELP}.")
    counts = Counter(_builder_for(p) for p in files)
    builder = max(counts, key=lambda b: (counts[b], -_BUILDER_PREFERENCE.index(b)))
    if len(counts) > 1:
        logger.warning(
            "Directory '%s' holds several data formats %s; loading only the %s files. Point at a single "
            "file to choose another.",
            path,
            dict(counts),
            builder,
        )
    return _as_dataset_dict(
        datasets.load_dataset(
            builder,
            data_files=_split_files(path, [p for p in files if _builder_for(p) == builder]),
            cache_dir=cache_dir,
        )
    )


def _split_files(root: Path, files: list[Path]) -> dict[str, list[str]]:
    """Group data files into splits by split words in their relative path (else all are ``train``)."""
    by_split: dict[str, list[str]] = {}
    unnamed: list[str] = []
    for f in files:
        words = set(re.split(r"[^a-z0-9]+", f.relative_to(root).as_posix().lower()))
        split = next((s for s, aliases in _SPLIT_WORDS.items() if words & aliases), None)
        (by_split.setdefault(split, []) if split else unnamed).append(str(f))
    if not by_split:
        return {"train": unnamed}
    if unnamed:
        logger.warning(
            "Ignoring %d file(s) in '%s' whose names carry no split name (train/validation/test): %s",
            len(unnamed),
            root,
            unnamed[:5],
        )
    return by_split


def _load_hub(name: str, config_name: str | None, cache_dir: str | None) -> DatasetDict:
    if config_name is None and ":" in name:
        name, config_name = name.split(":", 1)
    try:
        return _as_dataset_dict(datasets.load_dataset(name, config_name, cache_dir=cache_dir))
    except ConnectionError as e:
        raise ConnectionError(
            f"Could not reach the HuggingFace Hub to load dataset '{name}' and it is not in the local cache "
            f"({e}). Run once with internet access to cache it, or copy it here; {_LOCAL_FORMATS_HELP}."
        ) from e
    except (DatasetNotFoundError, RepositoryNotFoundError) as e:
        raise FileNotFoundError(
            f"Dataset '{name}' does not exist on the HuggingFace Hub (or is gated/private: run "
            f"`huggingface-cli login`), and there is no local path '{name}'. Check the spelling "
            f"(org/name); {_LOCAL_FORMATS_HELP}. Details: {e}"
        ) from e
    except ValueError as e:
        if config_name is not None or "config name is missing" not in str(e).lower():
            raise
        configs = datasets.get_dataset_config_names(name)
        chosen = next((c for c in ("main", "default") if c in configs), configs[0])
        logger.warning(
            "Dataset '%s' has several configs %s; using '%s'. Pick another with sft.dataset=%s:<config>.",
            name,
            configs,
            chosen,
            name,
        )
        return _load_hub(name, chosen, cache_dir)


def load_raw_dataset(
    name_or_path: str, cache_dir: str | None = None, config_name: str | None = None
) -> DatasetDict:
    """Load a dataset as a ``DatasetDict`` from the hub, a local path, or the builtin demo.

    ``name_or_path`` is, in order of precedence: ``"demo/arithmetic"`` or ``"demo/arithmetic_noisy"``
    (offline demos, see ``make_demo_arithmetic``); an existing local file (.json/.jsonl/.csv/.parquet/.txt, loaded as the
    ``train`` split), directory of such files, or ``save_to_disk`` directory; otherwise a HuggingFace
    Hub dataset name, optionally ``"name:config"`` (or pass ``config_name``). A hub dataset that needs a
    config and gets none uses ``main``/``default``/the first config, with a warning.

    Raises FileNotFoundError for a missing local path or unknown hub name and ConnectionError when
    the hub cannot be reached; both messages say how to use a local copy instead.
    """
    if name_or_path == DEMO_DATASET:
        return make_demo_arithmetic()
    if name_or_path == DEMO_NOISY_DATASET:
        return make_demo_arithmetic(wrong_fraction=0.3)
    path = Path(name_or_path).expanduser()
    if path.exists():
        dsd = _load_local(path, cache_dir)
    elif _looks_like_local_path(name_or_path):
        raise FileNotFoundError(
            f"Local dataset path '{path}' does not exist (cwd: {Path.cwd()}). Check the path, or give a "
            "HuggingFace Hub dataset name such as 'gsm8k'."
        )
    else:
        dsd = _load_hub(name_or_path, config_name, cache_dir)
    logger.info(
        "Loaded dataset '%s': %s", name_or_path, ", ".join(f"{k}={len(v)} rows" for k, v in dsd.items())
    )
    return dsd


# --------------------------------------------------------------------------------------------------
# Builtin offline demo dataset
# --------------------------------------------------------------------------------------------------

_DEMO_NAMES = ("Tom", "Ann", "Sam", "Mia", "Ben", "Lily", "Max", "Zoe")
_DEMO_ITEMS = ("apples", "books", "pens", "cards", "eggs", "coins")
_DEMO_SEED = 1234


def _demo_problem(rng: random.Random) -> tuple[str, str]:
    """One arithmetic word problem on small numbers and its GSM8K-style answer (``a + b = c`` then ``#### c``).

    The operands are single digits (sums up to 18, products up to 25): about 150 facts, few enough for the
    tiny demo model to learn in a few CPU minutes, so that SFT reaches a useful accuracy and RL can improve it.
    """
    name, item = rng.choice(_DEMO_NAMES), rng.choice(_DEMO_ITEMS)
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        question = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
        work, result = f"{a} + {b} = {a + b}", a + b
    elif kind == 1:
        a = rng.randint(2, 10)
        b = rng.randint(1, a - 1)
        question = f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?"
        work, result = f"{a} - {b} = {a - b}", a - b
    else:
        a, b = rng.randint(2, 5), rng.randint(2, 5)
        question = f"{name} fills {b} boxes with {a} {item} each. How many {item} does {name} have?"
        work, result = f"{b} * {a} = {a * b}", a * b
    return question, f"{work}\n#### {result}"


def make_demo_arithmetic(
    n_train: int = 2000, n_test: int = 200, seed: int = _DEMO_SEED, wrong_fraction: float = 0.0
) -> DatasetDict:
    """Deterministic arithmetic word problems (``question``/``answer``), no question in both splits.

    Answers look like GSM8K (``"3 + 5 = 8\\n#### 8"``); with the default prompt template every
    example is under 48 GPT-2 tokens, so a tiny model can learn it on CPU. ``wrong_fraction`` of the training
    answers (chosen by ``seed``) get a result off by one, in the work and the final answer alike
    (``"3 + 5 = 9\\n#### 9"``): SFT data from an unreliable source, which a verifier reward can correct and
    SFT cannot. The questions and the test split do not depend on it.
    """
    rng = random.Random(seed)
    seen: dict[str, str] = {}
    for _ in range(50 * (n_train + n_test)):
        if len(seen) == n_train + n_test:
            break
        q, a = _demo_problem(rng)
        seen.setdefault(q, a)
    else:
        raise ValueError(f"Cannot generate {n_train + n_test} distinct demo problems; ask for fewer.")
    questions, answers = list(seen), list(seen.values())
    train_answers = answers[:n_train]
    if wrong_fraction > 0:
        wrong_rng = random.Random(seed + 1)
        for index in wrong_rng.sample(range(n_train), round(wrong_fraction * n_train)):
            train_answers[index] = _off_by_one(train_answers[index], wrong_rng)
    return DatasetDict(
        {
            "train": Dataset.from_dict({"question": questions[:n_train], "answer": train_answers}),
            "test": Dataset.from_dict({"question": questions[n_train:], "answer": answers[n_train:]}),
        }
    )


def _off_by_one(answer: str, rng: random.Random) -> str:
    """A demo answer ``"a op b = c\\n#### c"`` with c replaced by c + 1 or c - 1 (c + 1 when c - 1 < 0)."""
    work, _ = answer.split("\n#### ")
    left, result = work.rsplit(" = ", 1)
    wrong = int(result) + (1 if int(result) == 0 or rng.random() < 0.5 else -1)
    return f"{left} = {wrong}\n#### {wrong}"


_FINAL_ANSWER_RE = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def extract_final_answer(text: str) -> str | None:
    """The number after the GSM8K ``####`` marker (commas removed), or None if there is none."""
    match = _FINAL_ANSWER_RE.search(text)
    return match.group(1).replace(",", "") if match else None


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------

_VALID_SPLIT_NAMES = ("validation", "valid", "test")


def make_splits(dsd: DatasetDict, valid_fraction: float = 0.05, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Return ``(train, valid)``.

    Train is the ``train`` split (or the only split, whatever its name). Validation is the first
    non-empty split among ``validation``, ``valid``, ``test``; without one, a seeded, deterministic
    ``valid_fraction`` of train (at least one row) is held out.
    """
    if len(dsd) == 0:
        raise ValueError("The dataset has no splits; check the dataset name/path.")
    if "train" in dsd:
        train_name = "train"
    elif len(dsd) == 1:
        train_name = next(iter(dsd))
        logger.info("No 'train' split; using the only split '%s' for training.", train_name)
    else:
        raise ValueError(
            f"The dataset has splits {list(dsd)} but none is named 'train'. Rename the training split to "
            "'train' (e.g. name the file train.jsonl) or give a dataset with a single split."
        )
    train = dsd[train_name]
    if len(train) == 0:
        raise ValueError(f"Split '{train_name}' of the dataset is empty; there is nothing to train on.")
    for name in _VALID_SPLIT_NAMES:
        if name != train_name and name in dsd:
            if len(dsd[name]) > 0:
                logger.info("Using split '%s' (%d rows) for validation.", name, len(dsd[name]))
                return train, dsd[name]
            logger.warning("Split '%s' is empty; ignoring it.", name)
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}.")
    if len(train) < 2:
        raise ValueError(
            f"Split '{train_name}' has {len(train)} row; need at least 2 to hold out a validation set."
        )
    n_valid = max(1, math.ceil(valid_fraction * len(train)))
    parts = train.train_test_split(test_size=n_valid, seed=seed, shuffle=True)
    logger.info("No validation split; held out %d of %d train rows (seed %d).", n_valid, len(train), seed)
    return parts["train"], parts["test"]


# --------------------------------------------------------------------------------------------------
# Field resolution and prompt template
# --------------------------------------------------------------------------------------------------

_AUTO_QUESTION = "question"
_AUTO_RESPONSES = ("answer", "solution")
_PROMPT_HINTS = ("question", "instruction", "prompt", "problem", "query", "input")
_RESPONSE_HINTS = ("answer", "solution", "response", "output", "completion", "target")
_ROLE_OPTIONS = {
    "question": "question_field",
    "response": "response_field",
    "thinking": "thinking_field",
    "attempt": "attempt_field",
    "text": "text_field",
}


@dataclass(frozen=True)
class FieldSpec:
    """Resolved field mode: which dataset columns form the prompt and the response.

    ``mode`` is ``"thinking"`` (question -> thinking + attempt), ``"qa"`` (question -> response) or
    ``"text"`` (whole ``text`` column is the response, empty prompt).
    """

    mode: str
    question: str | None = None
    response: str | None = None
    thinking: str | None = None
    attempt: str | None = None
    text: str | None = None

    def roles(self) -> dict[str, str]:
        """Role name -> column, for the roles this mode uses."""
        names = ("question", "response", "thinking", "attempt", "text")
        return {r: c for r in names if (c := getattr(self, r)) is not None}

    def describe(self) -> str:
        return f"{self.mode}: " + ", ".join(f"{r}={c!r}" for r, c in self.roles().items())


def _missing_field(field_name: str, option: str, columns: list[str]) -> ValueError:
    return ValueError(
        f"Field '{field_name}' (sft.{option}) is not a column of the dataset. Columns present: {columns}. "
        f"Set sft.{option}=<one of those columns>."
    )


def _need(field_name: str, option: str, columns: list[str]) -> str:
    if field_name not in columns:
        raise _missing_field(field_name, option, columns)
    return field_name


def _auto_question(columns: list[str]) -> str:
    if _AUTO_QUESTION in columns:
        return _AUTO_QUESTION
    raise ValueError(
        f"sft.question_field is not set and the dataset has no '{_AUTO_QUESTION}' column. "
        f"Columns present: {columns}. Set sft.question_field=<column holding the prompt>."
    )


def _auto_response(columns: list[str]) -> str:
    for name in _AUTO_RESPONSES:
        if name in columns:
            return name
    raise ValueError(
        f"sft.response_field is not set and the dataset has none of the columns {list(_AUTO_RESPONSES)}. "
        f"Columns present: {columns}. Set sft.response_field=<column holding the target>."
    )


def resolve_fields(
    columns: Sequence[str],
    text_field: str = DEFAULT_TEXT_FIELD,
    question_field: str | None = None,
    response_field: str | None = None,
    thinking_field: str | None = None,
    attempt_field: str | None = None,
) -> FieldSpec:
    """Decide which columns are prompt and response (the ``sft.*_field`` options).

    Priority:

    1. ``thinking_field`` + ``attempt_field`` (both required together): mode ``thinking``, target
       ``Thinking: <thinking>\\n\\nAttempt: <attempt>``; prompt from ``question_field`` (defaults to a
       ``question`` column).
    2. ``question_field`` and/or ``response_field``: mode ``qa``; the one not given is auto-detected
       (``question``; ``answer`` then ``solution``).
    3. An explicitly set ``text_field`` (anything but the default ``"text"``): mode ``text`` on that
       column, even if Q&A columns exist -- the user asked for it (e.g. ``sft.text_field=question``
       on GSM8K). It cannot be combined with the fields of 1-2.
    4. Auto-detection: ``question`` + ``answer``, then ``question`` + ``solution`` (S1K-1.1 gives
       question + solution). Only when ``text_field`` is left at ``"text"`` does this win over a
       ``text`` column.
    5. The ``text_field`` column (default ``"text"``): the whole text is the target, empty prompt.

    Any named field missing from ``columns`` raises ValueError naming it, listing the columns
    present and the ``sft.*`` option to fix.
    """
    cols = list(columns)
    text_field = text_field or DEFAULT_TEXT_FIELD
    given = {
        "question_field": question_field,
        "response_field": response_field,
        "thinking_field": thinking_field,
        "attempt_field": attempt_field,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if text_field != DEFAULT_TEXT_FIELD and given:
        raise ValueError(
            f"sft.text_field={text_field} conflicts with {', '.join(f'sft.{k}={v}' for k, v in given.items())}: "
            "text mode trains on one whole column, Q&A mode on prompt + response. Set only one of them."
        )

    if thinking_field is not None or attempt_field is not None:
        if thinking_field is None or attempt_field is None:
            missing = "sft.attempt_field" if attempt_field is None else "sft.thinking_field"
            raise ValueError(
                f"sft.thinking_field and sft.attempt_field must be set together; {missing} is missing. "
                "To train on one of them only, use sft.response_field=<column> instead."
            )
        if response_field is not None:
            raise ValueError(
                "sft.response_field cannot be combined with sft.thinking_field/sft.attempt_field "
                "(the target is built from thinking + attempt). Unset one of them."
            )
        question = _need(question_field, "question_field", cols) if question_field else _auto_question(cols)
        return FieldSpec(
            "thinking",
            question=question,
            thinking=_need(thinking_field, "thinking_field", cols),
            attempt=_need(attempt_field, "attempt_field", cols),
        )

    if question_field is not None or response_field is not None:
        question = _need(question_field, "question_field", cols) if question_field else _auto_question(cols)
        response = _need(response_field, "response_field", cols) if response_field else _auto_response(cols)
        return FieldSpec("qa", question=question, response=response)

    if text_field != DEFAULT_TEXT_FIELD:
        return FieldSpec("text", text=_need(text_field, "text_field", cols))

    if _AUTO_QUESTION in cols:
        for response in _AUTO_RESPONSES:
            if response in cols:
                logger.info("Auto-detected Q&A fields: question=%r, response=%r.", _AUTO_QUESTION, response)
                return FieldSpec("qa", question=_AUTO_QUESTION, response=response)

    if text_field in cols:
        return FieldSpec("text", text=text_field)

    prompt_hint = next((c for c in _PROMPT_HINTS if c in cols), "<prompt column>")
    response_hint = next((c for c in _RESPONSE_HINTS if c in cols and c != prompt_hint), "<target column>")
    raise ValueError(
        f"Cannot tell which columns to train on. Columns present: {cols}. Options: "
        f"sft.question_field={prompt_hint} sft.response_field={response_hint} (Q&A, loss on the response "
        "only); or sft.text_field=<column> (train on the whole text); or sft.question_field + "
        "sft.thinking_field + sft.attempt_field (reasoning traces). Auto-detection looks for "
        "question+answer, question+solution, or a 'text' column."
    )


@dataclass(frozen=True)
class PromptTemplate:
    """How prompt and thinking-mode targets are rendered (placeholders are replaced literally)."""

    prompt: str = "Question: {question}\nAnswer:"
    thinking_response: str = "Thinking: {thinking}\n\nAttempt: {attempt}"

    def __post_init__(self) -> None:
        if "{question}" not in self.prompt:
            raise ValueError(f"Prompt template {self.prompt!r} must contain '{{question}}'.")
        for key in ("{thinking}", "{attempt}"):
            if key not in self.thinking_response:
                raise ValueError(f"Thinking template {self.thinking_response!r} must contain '{key}'.")

    def render_prompt(self, question: str) -> str:
        return self.prompt.replace("{question}", question)

    def render_thinking_response(self, thinking: str, attempt: str) -> str:
        # Fill {attempt} first so a literal "{attempt}" inside the thinking text stays untouched.
        return self.thinking_response.replace("{attempt}", attempt).replace("{thinking}", thinking)


# --------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------

_KEEP, _TRUNCATED, _EMPTY_RESPONSE, _EMPTY_QUESTION, _TOO_LONG, _PROMPT_TOO_LONG = range(6)


@dataclass
class DataReport:
    """What ``tokenize_sft_dataset`` kept and dropped.

    ``n_in == n_kept + n_empty_response + n_empty_question + (n_too_long - n_truncated) +
    n_prompt_too_long``. ``n_too_long`` counts examples over ``max_length`` whose prompt fits (dropped,
    or kept with a cut response when ``n_truncated``); ``n_prompt_too_long`` are always dropped.
    Lengths are full lengths (prompt + response + EOS) of non-empty examples.
    """

    n_in: int
    n_kept: int
    max_length: int
    n_empty_response: int = 0
    n_empty_question: int = 0
    n_too_long: int = 0
    n_truncated: int = 0
    n_prompt_too_long: int = 0
    longest: int = 0
    length_percentiles: dict[str, int] = field(default_factory=dict)
    name: str = "data"

    def summary(self) -> str:
        pct = " ".join(f"{k}={v}" for k, v in self.length_percentiles.items()) or "n/a"
        return (
            f"{self.name}: kept {self.n_kept}/{self.n_in} examples (max_length={self.max_length}); "
            f"empty response {self.n_empty_response}, empty question {self.n_empty_question}, "
            f"too long {self.n_too_long} (truncated {self.n_truncated}, dropped "
            f"{self.n_too_long - self.n_truncated}), prompt too long {self.n_prompt_too_long}; "
            f"lengths {pct}"
        )


def _as_text(value: Any, role: str, column: str, row: int) -> str | None:
    """Field value as text; None for missing/blank values. Numbers are converted with ``str()``."""
    if value is None:
        return None
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, numbers.Number):
        return None if isinstance(value, float) and math.isnan(value) else str(value)
    raise ValueError(
        f"Row {row}: field '{column}' (sft.{_ROLE_OPTIONS[role]}) holds a {type(value).__name__}, not text. "
        "Pick a text column, or preprocess the dataset (e.g. join the list into one string) and load it "
        "from a local file."
    )


def join_response(prompt: str, response: str) -> str:
    """The response as it follows the prompt: after a space when the prompt ends in neither whitespace nor
    nothing and the response starts without one (`Answer:` + ` 42`), so that the response is tokenized the
    way GPT-2 tokenizes the joined text (` 42` is one token, as in pretraining)."""
    if prompt and not prompt[-1].isspace() and response and not response[0].isspace():
        return " " + response
    return response


def _tokenize_batch(
    batch: dict[str, list[Any]],
    indices: list[int],
    *,
    spec: FieldSpec,
    tokenizer: Any,
    max_length: int,
    template: PromptTemplate,
    truncate_response: bool,
) -> dict[str, list[Any]]:
    prompts, responses, status = [], [], []
    for i, row in enumerate(indices):
        values = {role: _as_text(batch[col][i], role, col, row) for role, col in spec.roles().items()}
        if spec.mode == "text":
            question, response = "", values["text"]
        elif spec.mode == "qa":
            question, response = values["question"], values["response"]
        else:
            thinking, attempt = values["thinking"], values["attempt"]
            question = values["question"]
            response = (
                None
                if thinking is None or attempt is None
                else template.render_thinking_response(thinking, attempt)
            )
        status.append(_EMPTY_RESPONSE if response is None else _EMPTY_QUESTION if question is None else _KEEP)
        prompt = template.render_prompt(question) if spec.mode != "text" and question else ""
        prompts.append(prompt)
        responses.append(join_response(prompt, response or ""))

    def encode(texts: list[str]) -> list[list[int]]:
        # split_special_tokens: a literal "<|endoftext|>" in the data stays text, never a real EOS.
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    eos = tokenizer.eos_token_id
    out: dict[str, list[Any]] = {"input_ids": [], "prompt_len": [], "length": [], "_status": [], "_full": []}
    for p, r, s in zip(encode(prompts), encode(responses), status, strict=True):
        full = len(p) + len(r) + 1 if s == _KEEP else 0
        ids: list[int] = []
        if s == _KEEP:
            if len(p) >= max_length:
                s = _PROMPT_TOO_LONG
            elif full > max_length:
                s = _TRUNCATED if truncate_response else _TOO_LONG
                ids = p + r[: max_length - len(p)] if truncate_response else []
            else:
                ids = p + r + [eos]
        out["input_ids"].append(ids)
        out["prompt_len"].append(len(p))
        out["length"].append(len(ids))
        out["_status"].append(s)
        out["_full"].append(full)
    return out


def _percentiles(lengths: np.ndarray) -> dict[str, int]:
    if lengths.size == 0:
        return {}
    qs = np.percentile(lengths, [50, 90, 99])
    return {"p50": int(qs[0]), "p90": int(qs[1]), "p99": int(qs[2]), "max": int(lengths.max())}


def tokenize_sft_dataset(
    ds: Dataset,
    spec: FieldSpec,
    tokenizer: Any,
    max_length: int,
    template: PromptTemplate | None = None,
    num_proc: int = 1,
    truncate_response: bool = False,
    name: str = "data",
) -> tuple[Dataset, DataReport]:
    """Tokenize one split into ``input_ids`` (prompt + response + EOS, unpadded), ``prompt_len``, ``length``.

    Field values must be text; numbers are converted with ``str()`` (GSM-style integer answers),
    None/blank values skip the example (counted), lists/dicts raise ValueError naming field and row.
    Examples longer than ``max_length`` are dropped, or with ``truncate_response`` keep a response cut
    to fit (no EOS, since the answer is incomplete); the prompt is never cut, and an example whose
    prompt alone fills ``max_length`` is always dropped. All of this is counted in the returned
    ``DataReport`` and logged; if nothing is kept a ValueError says why.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}.")
    template = template or PromptTemplate()
    missing = [c for c in spec.roles().values() if c not in ds.column_names]
    if missing:
        role = next(r for r, c in spec.roles().items() if c == missing[0])
        raise _missing_field(missing[0], _ROLE_OPTIONS[role], ds.column_names)
    fn = functools.partial(
        _tokenize_batch,
        spec=spec,
        tokenizer=tokenizer,
        max_length=max_length,
        template=template,
        truncate_response=truncate_response,
    )
    mapped = ds.map(
        fn,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        num_proc=num_proc if num_proc > 1 else None,
        desc=f"Tokenizing {name}",
    )
    status = np.asarray(mapped["_status"], dtype=np.int64)
    full = np.asarray(mapped["_full"], dtype=np.int64)
    counts = np.bincount(status, minlength=6)
    n_kept = int(counts[_KEEP] + counts[_TRUNCATED])
    nonempty = full[full > 0]
    report = DataReport(
        n_in=len(ds),
        n_kept=n_kept,
        max_length=max_length,
        n_empty_response=int(counts[_EMPTY_RESPONSE]),
        n_empty_question=int(counts[_EMPTY_QUESTION]),
        n_too_long=int(counts[_TOO_LONG] + counts[_TRUNCATED]),
        n_truncated=int(counts[_TRUNCATED]),
        n_prompt_too_long=int(counts[_PROMPT_TOO_LONG]),
        longest=int(nonempty.max()) if nonempty.size else 0,
        length_percentiles=_percentiles(nonempty),
        name=name,
    )
    logger.info(report.summary())
    if n_kept == 0:
        if report.n_too_long + report.n_prompt_too_long > 0:
            raise ValueError(
                f"Every example was dropped as too long. {report.summary()}. Raise sft.max_length (e.g. "
                f"to {report.length_percentiles.get('p90', report.longest)} to keep ~90%) or allow "
                "response truncation."
            )
        raise ValueError(
            f"No usable examples: {report.summary()}. The selected fields ({spec.describe()}) are empty; "
            "check the sft.*_field options."
        )
    dropped_long = report.n_too_long - report.n_truncated + report.n_prompt_too_long
    if dropped_long:
        logger.warning(
            "%s: dropped %d example(s) longer than max_length=%d (longest %d); raise sft.max_length to "
            "keep them.",
            name,
            dropped_long,
            max_length,
            report.longest,
        )
    keep = np.flatnonzero((status == _KEEP) | (status == _TRUNCATED))
    return mapped.select(keep).remove_columns(["_status", "_full"]), report


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------


def sft_collate(
    examples: list[dict[str, Any]], pad_id: int, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad tokenized examples into a batch.

    Returns ``input_ids`` [B, L] long, ``attention_mask`` [B, L] long (1 = real token),
    ``loss_mask`` [B, L] float (1 on response + EOS), ``labels`` [B, L] long (token id on response +
    EOS, -100 on prompt and padding) and ``prompt_len`` [B] long. ``L`` is the longest example, or
    ``pad_to`` when given. Masks come from positions, so ``pad_id`` may equal the EOS id.
    """
    if not examples:
        raise ValueError("sft_collate got an empty batch.")
    lengths = [len(ex["input_ids"]) for ex in examples]
    width = max(lengths) if pad_to is None else pad_to
    if max(lengths) > width:
        raise ValueError(f"An example has {max(lengths)} tokens, more than pad_to={pad_to}.")
    batch = len(examples)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    loss_mask = torch.zeros((batch, width), dtype=torch.float)
    prompt_len = torch.tensor([int(ex["prompt_len"]) for ex in examples], dtype=torch.long)
    for i, (ex, n) in enumerate(zip(examples, lengths, strict=True)):
        input_ids[i, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
        loss_mask[i, int(prompt_len[i]) : n] = 1.0
    labels = torch.where(loss_mask.bool(), input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "labels": labels,
        "prompt_len": prompt_len,
    }


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Yield indices so that each batch holds examples of similar length (less padding).

    Per epoch (deterministic in ``(seed, epoch)``; call ``set_epoch``): shuffle all indices, cut them
    into mega-batches of ``global_batch * group_size_multiplier``, sort each by length (descending),
    cut into global batches (``batch_size * num_replicas``), shuffle their order and move the
    longest batch first (fail fast on OOM). Rank ``r`` takes slice ``r`` of every global batch, so use
    it with ``DataLoader(batch_size=batch_size, sampler=...)``. The last, partial global batch stays
    last; it is dropped with ``drop_last``, otherwise (for several replicas) padded by repeating its
    own indices so every rank yields the same number of indices. With one replica and no
    ``drop_last`` every index is yielded exactly once. ``group_by_length=False`` skips the sorting
    (plain shuffled batches, same sharding).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        group_size_multiplier: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        group_by_length: bool = True,
    ) -> None:
        if batch_size < 1 or group_size_multiplier < 1 or num_replicas < 1:
            raise ValueError("batch_size, group_size_multiplier and num_replicas must be >= 1.")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}.")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.group_size_multiplier = group_size_multiplier
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, drop_last
        self.group_by_length = group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _global_batches(self) -> tuple[list[np.ndarray], np.ndarray | None]:
        """Full global batches in yield order, and the partial last one (or None)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.lengths)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        global_bs = self.batch_size * self.num_replicas
        mega = global_bs * self.group_size_multiplier
        batches: list[np.ndarray] = []
        for start in range(0, n, mega):
            chunk = order[start : start + mega]
            if self.group_by_length:
                chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i : i + global_bs] for i in range(0, len(chunk), global_bs))
        partial = batches.pop() if batches and len(batches[-1]) < global_bs else None
        if self.shuffle and self.group_by_length and batches:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        if batches and self.group_by_length:
            longest = int(np.argmax([self.lengths[b].max() for b in batches]))
            batches[0], batches[longest] = batches[longest], batches[0]
        return batches, partial

    def _partial_share(self, size: int) -> int:
        return 0 if size == 0 or self.drop_last else math.ceil(size / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        batches, partial = self._global_batches()
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        parts = [b[lo:hi] for b in batches]
        if partial is not None and not self.drop_last:
            share = self._partial_share(len(partial))
            padded = np.resize(partial, share * self.num_replicas)
            parts.append(padded[self.rank * share : (self.rank + 1) * share])
        return iter(np.concatenate(parts).tolist() if parts else [])

    def __len__(self) -> int:
        global_bs = self.batch_size * self.num_replicas
        n_full, rest = divmod(len(self.lengths), global_bs)
        return n_full * self.batch_size + self._partial_share(rest)


# --------------------------------------------------------------------------------------------------
# One-call SFT data
# --------------------------------------------------------------------------------------------------


class SFTData(NamedTuple):
    train: Dataset
    valid: Dataset
    spec: FieldSpec
    reports: dict[str, DataReport]


def build_sft_datasets(
    name_or_path: str,
    tokenizer: Any,
    max_length: int,
    *,
    text_field: str = DEFAULT_TEXT_FIELD,
    question_field: str | None = None,
    response_field: str | None = None,
    thinking_field: str | None = None,
    attempt_field: str | None = None,
    template: PromptTemplate | None = None,
    valid_fraction: float = 0.05,
    seed: int = 0,
    truncate_response: bool = False,
    num_proc: int = 1,
    cache_dir: str | None = None,
    config_name: str | None = None,
) -> SFTData:
    """Load -> resolve fields -> split -> tokenize both splits. Returns ``(train, valid, spec, reports)``."""
    dsd = load_raw_dataset(name_or_path, cache_dir=cache_dir, config_name=config_name)
    train_raw, valid_raw = make_splits(dsd, valid_fraction=valid_fraction, seed=seed)
    spec = resolve_fields(
        train_raw.column_names,
        text_field=text_field,
        question_field=question_field,
        response_field=response_field,
        thinking_field=thinking_field,
        attempt_field=attempt_field,
    )
    logger.info("SFT fields: %s", spec.describe())
    template = template or PromptTemplate()
    kwargs = {"num_proc": num_proc, "truncate_response": truncate_response}
    train, train_report = tokenize_sft_dataset(
        train_raw, spec, tokenizer, max_length, template, name="train", **kwargs
    )
    valid, valid_report = tokenize_sft_dataset(
        valid_raw, spec, tokenizer, max_length, template, name="valid", **kwargs
    )
    return SFTData(train, valid, spec, {"train": train_report, "valid": valid_report})


# --------------------------------------------------------------------------------------------------
# Pretraining corpus
# --------------------------------------------------------------------------------------------------


def load_text_corpus(
    name_or_path: str, text_field: str = DEFAULT_TEXT_FIELD, cache_dir: str | None = None
) -> DatasetDict:
    """Load a pretraining corpus (hub name, or local .txt/.jsonl/... file or directory).

    Every split must have the ``text_field`` column (``.txt`` files give one ``text`` row per line).
    """
    dsd = load_raw_dataset(name_or_path, cache_dir=cache_dir)
    for split, ds in dsd.items():
        if text_field not in ds.column_names:
            raise ValueError(
                f"Split '{split}' of '{name_or_path}' has no '{text_field}' column. Columns present: "
                f"{ds.column_names}. Choose the text column (text_field=<column>)."
            )
    return dsd


def _tokenize_docs(batch: dict[str, list[Any]], *, tokenizer: Any, text_field: str) -> dict[str, list[Any]]:
    texts = [t if isinstance(t, str) else "" for t in batch[text_field]]
    ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    docs = [x + [eos] if t else [] for x, t in zip(ids, texts, strict=True)]
    return {"ids": docs, "n": [len(d) for d in docs]}


def _gather_blocks(
    block_idx: list[int], *, tokens: Dataset, offsets: np.ndarray, block_size: int
) -> dict[str, list[Any]]:
    """Cut blocks ``block_idx`` (consecutive) out of the global token stream of ``tokens``."""
    starts = np.asarray(block_idx, dtype=np.int64) * block_size
    first_doc = int(np.searchsorted(offsets, starts[0], side="right")) - 1
    end_doc = int(np.searchsorted(offsets, starts[-1] + block_size, side="left"))
    docs = tokens[first_doc:end_doc]["ids"]
    stream = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs])
    base = offsets[first_doc]
    return {"input_ids": [stream[s - base : s - base + block_size] for s in starts]}


def pack_tokens(
    ds: Dataset,
    tokenizer: Any,
    block_size: int,
    text_field: str = DEFAULT_TEXT_FIELD,
    num_proc: int = 1,
    batch_size: int = 1000,
) -> Dataset:
    """Concatenate documents (each followed by EOS) and cut the stream into ``block_size`` chunks.

    Returns a Dataset with one column ``input_ids`` of exactly ``block_size`` tokens per row. Only the
    final remainder of the stream (< ``block_size`` tokens) is dropped, and logged. Empty documents
    are skipped. Both steps are batched ``map`` calls (``batch_size`` rows, ``num_proc`` workers).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    if text_field not in ds.column_names:
        raise ValueError(f"No '{text_field}' column to pack; columns present: {ds.column_names}.")
    proc = num_proc if num_proc > 1 else None
    tokens = ds.map(
        functools.partial(_tokenize_docs, tokenizer=tokenizer, text_field=text_field),
        batched=True,
        batch_size=batch_size,
        remove_columns=ds.column_names,
        num_proc=proc,
        desc="Tokenizing corpus",
    )
    offsets = np.concatenate([[0], np.cumsum(np.asarray(tokens["n"], dtype=np.int64))])
    total = int(offsets[-1])
    n_blocks, dropped = divmod(total, block_size)
    if n_blocks == 0:
        raise ValueError(
            f"The corpus has {total} tokens, fewer than one block of {block_size}; use more text or a "
            "smaller block size."
        )
    logger.info(
        "Packed %d tokens into %d blocks of %d; dropped the final %d tokens.",
        total,
        n_blocks,
        block_size,
        dropped,
    )
    gather = functools.partial(
        _gather_blocks, tokens=tokens.select_columns(["ids"]), offsets=offsets, block_size=block_size
    )
    index = Dataset.from_dict({"block": list(range(n_blocks))})
    return index.map(
        gather,
        batched=True,
        batch_size=batch_size,
        input_columns="block",
        remove_columns=["block"],
        num_proc=proc,
        desc="Packing",
    )
