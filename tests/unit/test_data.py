"""Tests for data.py on small local datasets with the real schemas of S1K-1.1, GSM8K, Alpaca, Dolly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from datasets import Dataset, DatasetDict

import data
from data import (
    IGNORE_INDEX,
    DataReport,
    FieldSpec,
    LengthGroupedSampler,
    PromptTemplate,
    build_sft_datasets,
    extract_final_answer,
    join_response,
    load_raw_dataset,
    load_text_corpus,
    make_demo_arithmetic,
    make_splits,
    pack_tokens,
    resolve_fields,
    sft_collate,
    tokenize_sft_dataset,
)
from tokenizer import EOS_ID, get_tokenizer

# --------------------------------------------------------------------------------------------------
# Fixtures: rows with the real column schemas
# --------------------------------------------------------------------------------------------------

S1K_ROWS = [
    {
        "solution": "The answer is $\\boxed{12}$ since 3 \u00d7 4 = 12.",
        "question": "Compute $3 \\times 4$. Give the exact value.",
        "cot_type": "math",
        "source_type": "AI-MO/NuminaMath-CoT/aops_forum",
        "metadata": "{'problem_type': 'Algebra'}",
        "gemini_thinking_trajectory": "We multiply 3 by 4.\nThat is 12.",
        "gemini_attempt": "Final Answer: 12",
        "deepseek_thinking_trajectory": "Okay, so 3 times 4... that's 12, I think. Let me double-check: 4+4+4=12.",
        "deepseek_attempt": "**Answer:** $12$",
        "gemini_grade": "Yes",
        "gemini_grade_reason": "Correct.",
        "deepseek_grade": "Yes",
        "deepseek_grade_reason": "Matches the reference.",
    },
    {
        "solution": "Let $x = \u221a2$. Then $x^2 = 2$, so the value is 2.",
        "question": "What is $(\\sqrt{2})^2$?",
        "cot_type": "math",
        "source_type": "qq8933/AIME_1983_2024",
        "metadata": "{'Year': 1990}",
        "gemini_thinking_trajectory": "Squaring a square root gives the radicand: 2.",
        "gemini_attempt": "2",
        "deepseek_thinking_trajectory": "  Square root squared is 2.  ",
        "deepseek_attempt": "The value is 2.",
        "gemini_grade": "Yes",
        "gemini_grade_reason": "ok",
        "deepseek_grade": "No",
        "deepseek_grade_reason": "format",
    },
]
S1K_COLUMNS = list(S1K_ROWS[0])

GSM8K_ROWS = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
        "in May. How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
        "clips altogether in April and May.\n#### 72",
    },
    {
        "question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of "
        "babysitting. How much did she earn?",
        "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned "
        "0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
    },
]

ALPACA_ROWS = [
    {
        "instruction": "Give three tips for staying healthy.",
        "input": "",
        "output": "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Get enough sleep.",
        "text": "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nGive three tips for staying healthy.\n\n"
        "### Response:\n1. Eat a balanced diet.\n2. Exercise regularly.\n3. Get enough sleep.",
    },
    {
        "instruction": "Translate to French.",
        "input": "Good morning",
        "output": "Bonjour",
        "text": "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
        "Translate to French.\n\n### Input:\nGood morning\n\n### Response:\nBonjour",
    },
]

DOLLY_ROWS = [
    {
        "instruction": "When did Virgin Australia start operating?",
        "context": "Virgin Australia commenced services on 31 August 2000 as Virgin Blue.",
        "response": "Virgin Australia commenced services on 31 August 2000.",
        "category": "closed_qa",
    },
    {
        "instruction": "Which is a species of fish? Tope or Rope",
        "context": "",
        "response": "Tope",
        "category": "classification",
    },
]


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


@pytest.fixture
def cache_dir(tmp_path: Path) -> str:
    return str(tmp_path / "hf_cache")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def check_masks(tok, ds: Dataset, prompts: list[str], responses: list[str]) -> None:
    """Loss mask covers exactly response + EOS; prompt tokens decode to the rendered prompt."""
    assert len(ds) == len(prompts) == len(responses)
    batch = sft_collate([ds[i] for i in range(len(ds))], pad_id=tok.pad_token_id)
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        response = join_response(prompt, response)
        ids, mask, labels = batch["input_ids"][i], batch["loss_mask"][i].bool(), batch["labels"][i]
        n, p = int(batch["attention_mask"][i].sum()), int(batch["prompt_len"][i])
        assert p == len(ids_of(tok, prompt))
        assert tok.decode(ids[:p].tolist()) == prompt
        target = ids[mask].tolist()
        assert target[-1] == EOS_ID and mask[p:n].all() and not mask[:p].any() and not mask[n:].any()
        assert tok.decode(target[:-1]) == response
        assert target[:-1] == ids_of(tok, response)
        assert (labels[mask] == ids[mask]).all() and (labels[~mask] == IGNORE_INDEX).all()


# --------------------------------------------------------------------------------------------------
# resolve_fields
# --------------------------------------------------------------------------------------------------


def test_resolve_s1k_auto_detects_question_solution():
    assert resolve_fields(S1K_COLUMNS) == FieldSpec("qa", question="question", response="solution")


def test_resolve_thinking_mode():
    spec = resolve_fields(
        S1K_COLUMNS,
        question_field="question",
        thinking_field="deepseek_thinking_trajectory",
        attempt_field="deepseek_attempt",
    )
    assert spec == FieldSpec(
        "thinking", question="question", thinking="deepseek_thinking_trajectory", attempt="deepseek_attempt"
    )


def test_resolve_priorities():
    gsm = ["question", "answer"]
    assert resolve_fields(gsm) == FieldSpec("qa", question="question", response="answer")
    # answer wins over solution
    assert resolve_fields(["question", "solution", "answer"]).response == "answer"
    # explicit non-default text_field beats Q&A auto-detection (guide: sft.dataset=gsm8k sft.text_field=question)
    assert resolve_fields(gsm, text_field="question") == FieldSpec("text", text="question")
    # default text_field: auto-detected Q&A wins over a text column
    assert resolve_fields(["question", "answer", "text"]).mode == "qa"
    alpaca = list(ALPACA_ROWS[0])
    assert resolve_fields(alpaca) == FieldSpec("text", text="text")
    assert resolve_fields(alpaca, question_field="instruction", response_field="output") == FieldSpec(
        "qa", question="instruction", response="output"
    )
    # only one side given: the other is auto-detected
    assert resolve_fields(S1K_COLUMNS, response_field="gemini_attempt") == FieldSpec(
        "qa", question="question", response="gemini_attempt"
    )
    assert resolve_fields(gsm, question_field="question").response == "answer"


def test_resolve_missing_field_names_it_and_lists_columns():
    with pytest.raises(ValueError) as err:
        resolve_fields(S1K_COLUMNS, thinking_field="gemini_thinking", attempt_field="gemini_attempt")
    msg = str(err.value)
    assert "'gemini_thinking'" in msg and "sft.thinking_field" in msg
    assert all(c in msg for c in S1K_COLUMNS)
    with pytest.raises(ValueError, match=r"sft\.response_field.*deepseek_grade_reason"):
        resolve_fields(S1K_COLUMNS, question_field="question", response_field="nope")
    with pytest.raises(ValueError, match=r"'content'.*sft\.text_field"):
        resolve_fields(["question", "answer"], text_field="content")


def test_resolve_nothing_matches_lists_columns_and_options():
    dolly = list(DOLLY_ROWS[0])
    with pytest.raises(ValueError) as err:
        resolve_fields(dolly)
    msg = str(err.value)
    assert all(c in msg for c in dolly)
    assert "sft.question_field=instruction sft.response_field=response" in msg
    assert "sft.text_field" in msg and "sft.thinking_field" in msg


def test_resolve_invalid_combinations():
    with pytest.raises(ValueError, match="must be set together; sft.attempt_field"):
        resolve_fields(S1K_COLUMNS, question_field="question", thinking_field="gemini_thinking_trajectory")
    with pytest.raises(ValueError, match="must be set together; sft.thinking_field"):
        resolve_fields(S1K_COLUMNS, attempt_field="gemini_attempt")
    with pytest.raises(ValueError, match="conflicts"):
        resolve_fields(S1K_COLUMNS, text_field="question", response_field="solution")
    with pytest.raises(ValueError, match="sft.question_field is not set"):
        resolve_fields(list(DOLLY_ROWS[0]), response_field="response")


# --------------------------------------------------------------------------------------------------
# Tokenization and loss masks per field mode
# --------------------------------------------------------------------------------------------------


def test_s1k_qa_masks(tok):
    ds = Dataset.from_list(S1K_ROWS)
    template = PromptTemplate()
    spec = resolve_fields(ds.column_names)
    out, report = tokenize_sft_dataset(ds, spec, tok, max_length=256, template=template)
    assert set(out.column_names) == {"input_ids", "prompt_len", "length"}
    assert report.n_kept == report.n_in == 2
    check_masks(
        tok,
        out,
        [template.render_prompt(r["question"]) for r in S1K_ROWS],
        [r["solution"] for r in S1K_ROWS],
    )
    assert out["length"] == [len(x) for x in out["input_ids"]]


@pytest.mark.parametrize("model", ["gemini", "deepseek"])
def test_s1k_thinking_masks(tok, model):
    ds = Dataset.from_list(S1K_ROWS)
    spec = resolve_fields(
        ds.column_names,
        question_field="question",
        thinking_field=f"{model}_thinking_trajectory",
        attempt_field=f"{model}_attempt",
    )
    out, _ = tokenize_sft_dataset(ds, spec, tok, max_length=256, template=PromptTemplate())
    targets = [
        f"Thinking: {r[f'{model}_thinking_trajectory']}\n\nAttempt: {r[f'{model}_attempt']}" for r in S1K_ROWS
    ]
    check_masks(tok, out, [f"Question: {r['question']}\nAnswer:" for r in S1K_ROWS], targets)


def test_gsm8k_masks_and_text_field_question(tok):
    ds = Dataset.from_list(GSM8K_ROWS)
    out, _ = tokenize_sft_dataset(ds, resolve_fields(ds.column_names), tok, 256, PromptTemplate())
    check_masks(
        tok,
        out,
        [f"Question: {r['question']}\nAnswer:" for r in GSM8K_ROWS],
        [r["answer"] for r in GSM8K_ROWS],
    )
    spec = resolve_fields(ds.column_names, text_field="question")
    out, _ = tokenize_sft_dataset(ds, spec, tok, 256, PromptTemplate())
    assert out["prompt_len"] == [0, 0]
    check_masks(tok, out, ["", ""], [r["question"] for r in GSM8K_ROWS])


def test_alpaca_text_mode_and_qa_mode(tok):
    ds = Dataset.from_list(ALPACA_ROWS)
    out, _ = tokenize_sft_dataset(ds, resolve_fields(ds.column_names), tok, 256, PromptTemplate())
    check_masks(tok, out, ["", ""], [r["text"] for r in ALPACA_ROWS])
    spec = resolve_fields(ds.column_names, question_field="instruction", response_field="output")
    out, _ = tokenize_sft_dataset(ds, spec, tok, 256, PromptTemplate())
    check_masks(
        tok,
        out,
        [f"Question: {r['instruction']}\nAnswer:" for r in ALPACA_ROWS],
        [r["output"] for r in ALPACA_ROWS],
    )


def test_dolly_explicit_fields_and_custom_template(tok):
    ds = Dataset.from_list(DOLLY_ROWS)
    template = PromptTemplate(prompt="### Instruction:\n{question}\n\n### Response:\n")
    spec = resolve_fields(ds.column_names, question_field="instruction", response_field="response")
    out, _ = tokenize_sft_dataset(ds, spec, tok, 256, template)
    check_masks(
        tok,
        out,
        [f"### Instruction:\n{r['instruction']}\n\n### Response:\n" for r in DOLLY_ROWS],
        [r["response"] for r in DOLLY_ROWS],
    )


def test_template_validation_and_literal_braces():
    with pytest.raises(ValueError, match="question"):
        PromptTemplate(prompt="Q: {q}")
    with pytest.raises(ValueError, match="attempt"):
        PromptTemplate(thinking_response="{thinking}")
    t = PromptTemplate(prompt='{"q": "{question}"}')
    assert t.render_prompt("a {b} c") == '{"q": "a {b} c"}'
    assert (
        PromptTemplate().render_thinking_response("x {attempt}", "y") == "Thinking: x {attempt}\n\nAttempt: y"
    )


def test_missing_column_at_tokenize_time(tok):
    ds = Dataset.from_list(GSM8K_ROWS)
    with pytest.raises(ValueError, match=r"'solution'.*sft\.response_field.*\['question', 'answer'\]"):
        tokenize_sft_dataset(ds, FieldSpec("qa", question="question", response="solution"), tok, 64)


def test_empty_values_numbers_and_bad_types(tok):
    rows = [
        {"question": "q0", "answer": "fine"},
        {"question": "q1", "answer": None},
        {"question": "q2", "answer": ""},
        {"question": "q3", "answer": "   \n"},
        {"question": None, "answer": "orphan"},
        {"question": "q5", "answer": "ok"},
    ]
    ds = Dataset.from_list(rows)
    out, report = tokenize_sft_dataset(ds, resolve_fields(ds.column_names), tok, 64)
    assert (report.n_in, report.n_kept, report.n_empty_response, report.n_empty_question) == (6, 2, 3, 1)
    check_masks(tok, out, ["Question: q0\nAnswer:", "Question: q5\nAnswer:"], ["fine", "ok"])

    ints = Dataset.from_dict({"question": ["Two plus two?"], "answer": [4]})
    out, _ = tokenize_sft_dataset(ints, resolve_fields(ints.column_names), tok, 64)
    check_masks(tok, out, ["Question: Two plus two?\nAnswer:"], ["4"])

    lists = Dataset.from_dict({"question": ["a", "b"], "answer": [["x"], ["y", "z"]]})
    with pytest.raises(ValueError, match=r"Row 0: field 'answer' \(sft\.response_field\) holds a list"):
        tokenize_sft_dataset(lists, resolve_fields(lists.column_names), tok, 64)

    thinking = Dataset.from_list([dict(S1K_ROWS[0], gemini_attempt=None), S1K_ROWS[1]])
    spec = resolve_fields(
        thinking.column_names, thinking_field="gemini_thinking_trajectory", attempt_field="gemini_attempt"
    )
    out, report = tokenize_sft_dataset(thinking, spec, tok, 256)
    assert (report.n_kept, report.n_empty_response) == (1, 1)


def test_all_empty_is_an_error(tok):
    ds = Dataset.from_dict({"question": ["a", "b"], "answer": ["", None]})
    with pytest.raises(ValueError, match="empty"):
        tokenize_sft_dataset(ds, resolve_fields(ds.column_names), tok, 64)


def test_literal_eos_text_is_not_an_eos(tok):
    ds = Dataset.from_dict({"text": ["before <|endoftext|> after"]})
    out, _ = tokenize_sft_dataset(ds, resolve_fields(ds.column_names), tok, 64)
    ids = out[0]["input_ids"]
    assert ids.count(EOS_ID) == 1 and ids[-1] == EOS_ID
    assert tok.decode(ids[:-1]) == "before <|endoftext|> after"


def _length_rows(tok) -> tuple[Dataset, dict[str, int]]:
    """Rows whose full lengths are known, for max_length = 24."""
    short_q, long_q = "Add these.", " ".join(["word"] * 30)
    rows = [
        {"question": short_q, "answer": "1 + 1 = 2"},  # fits
        {"question": short_q, "answer": " ".join(["two"] * 40)},  # response too long
        {"question": long_q, "answer": "x"},  # prompt alone too long
    ]
    prompt_lens = {
        "short": len(ids_of(tok, f"Question: {short_q}\nAnswer:")),
        "long": len(ids_of(tok, f"Question: {long_q}\nAnswer:")),
    }
    return Dataset.from_list(rows), prompt_lens


def _assert_report_sums(r: DataReport) -> None:
    dropped = r.n_empty_response + r.n_empty_question + r.n_too_long - r.n_truncated + r.n_prompt_too_long
    assert r.n_in == r.n_kept + dropped


def test_overlong_dropped_by_default(tok, caplog):
    ds, _ = _length_rows(tok)
    with caplog.at_level("INFO", logger="data"):
        out, report = tokenize_sft_dataset(ds, resolve_fields(ds.column_names), tok, 24, name="train")
    assert (report.n_kept, report.n_too_long, report.n_truncated, report.n_prompt_too_long) == (1, 1, 0, 1)
    assert report.longest > 24 and report.length_percentiles["max"] == report.longest
    assert out[0]["input_ids"][-1] == EOS_ID and max(out["length"]) <= 24
    _assert_report_sums(report)
    assert "kept 1/3" in caplog.text and "raise sft.max_length" in caplog.text


def test_overlong_truncated_only_in_response(tok):
    ds, prompt_lens = _length_rows(tok)
    out, report = tokenize_sft_dataset(ds, resolve_fields(ds.column_names), tok, 24, truncate_response=True)
    assert (report.n_kept, report.n_too_long, report.n_truncated, report.n_prompt_too_long) == (2, 1, 1, 1)
    _assert_report_sums(report)
    cut = out[1]
    assert cut["length"] == 24 and cut["prompt_len"] == prompt_lens["short"]
    assert cut["input_ids"][: cut["prompt_len"]] == ids_of(tok, "Question: Add these.\nAnswer:")
    assert EOS_ID not in cut["input_ids"]  # an incomplete answer gets no EOS
    response = ids_of(tok, " " + " ".join(["two"] * 40))
    assert cut["input_ids"][cut["prompt_len"] :] == response[: 24 - prompt_lens["short"]]


def test_every_example_too_long_is_an_error(tok):
    ds, _ = _length_rows(tok)
    with pytest.raises(
        ValueError, match=r"(?s)Every example was dropped as too long.*p50=\d+.*sft\.max_length"
    ):
        tokenize_sft_dataset(ds, resolve_fields(ds.column_names), tok, 8)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet"])
def test_load_local_files(tmp_path, cache_dir, fmt):
    path = tmp_path / f"gsm8k.{fmt}"
    df = pd.DataFrame(GSM8K_ROWS)
    if fmt == "json":
        path.write_text(json.dumps(GSM8K_ROWS), encoding="utf-8")
    elif fmt == "jsonl":
        write_jsonl(path, GSM8K_ROWS)
    elif fmt == "csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path)
    dsd = load_raw_dataset(str(path), cache_dir=cache_dir)
    assert isinstance(dsd, DatasetDict) and list(dsd) == ["train"]
    assert dsd["train"].to_list() == GSM8K_ROWS


def test_load_save_to_disk(tmp_path, cache_dir):
    ds = Dataset.from_list(S1K_ROWS)
    ds.save_to_disk(str(tmp_path / "single"))
    dsd = load_raw_dataset(str(tmp_path / "single"), cache_dir=cache_dir)
    assert list(dsd) == ["train"] and dsd["train"].column_names == S1K_COLUMNS
    DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    dsd = load_raw_dataset(str(tmp_path / "dict"), cache_dir=cache_dir)
    assert {k: len(v) for k, v in dsd.items()} == {"train": 2, "test": 1}


def test_load_directory_of_files(tmp_path, cache_dir):
    write_jsonl(tmp_path / "d" / "train.jsonl", GSM8K_ROWS)
    write_jsonl(tmp_path / "d" / "validation.jsonl", GSM8K_ROWS[:1])
    dsd = load_raw_dataset(str(tmp_path / "d"), cache_dir=cache_dir)
    assert {k: len(v) for k, v in dsd.items()} == {"train": 2, "validation": 1}
    # a hub snapshot: parquet data plus json metadata -> the parquet files are loaded
    snap = tmp_path / "snapshot"
    (snap / "data").mkdir(parents=True)
    pd.DataFrame(S1K_ROWS).to_parquet(snap / "data" / "train-00000-of-00001.parquet")
    pd.DataFrame(S1K_ROWS[:1]).to_parquet(snap / "data" / "test-00000-of-00001.parquet")
    (snap / "dataset_infos.json").write_text("{}")
    (snap / "README.md").write_text("# s1K")
    dsd = load_raw_dataset(str(snap), cache_dir=cache_dir)
    assert {k: len(v) for k, v in dsd.items()} == {"train": 2, "test": 1}
    assert dsd["train"].column_names == S1K_COLUMNS
    # files without split names all go to train
    write_jsonl(tmp_path / "parts" / "part1.jsonl", GSM8K_ROWS)
    write_jsonl(tmp_path / "parts" / "part2.jsonl", GSM8K_ROWS[:1])
    assert len(load_raw_dataset(str(tmp_path / "parts"), cache_dir=cache_dir)["train"]) == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no usable data"):
        load_raw_dataset(str(tmp_path / "empty"), cache_dir=cache_dir)


def test_load_missing_or_unsupported_local_path(tmp_path, cache_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_raw_dataset(str(tmp_path / "nope.jsonl"), cache_dir=cache_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_raw_dataset("./not/here", cache_dir=cache_dir)
    bad = tmp_path / "data.xlsx"
    bad.write_text("x")
    with pytest.raises(ValueError, match=r"\.jsonl"):
        load_raw_dataset(str(bad), cache_dir=cache_dir)


def test_hub_unreachable_and_unknown_name(monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'gsm8k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(
        ConnectionError, match=r"(?s)Could not reach the HuggingFace Hub.*local path also works"
    ):
        load_raw_dataset("gsm8k")

    def not_found(*args, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError("Dataset 'org/typo' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", not_found)
    with pytest.raises(FileNotFoundError, match=r"(?s)does not exist on the HuggingFace Hub.*local path"):
        load_raw_dataset("org/typo")


def test_hub_config_selection(monkeypatch):
    calls = []

    def fake_load(name, config=None, cache_dir=None):
        calls.append((name, config))
        if config is None:
            raise ValueError("Config name is missing.\nPlease pick one among the available configs: ['main']")
        return DatasetDict({"train": Dataset.from_list(GSM8K_ROWS)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(datasets, "get_dataset_config_names", lambda name: ["socratic", "main"])
    assert len(load_raw_dataset("gsm8k")["train"]) == 2
    assert calls == [("gsm8k", None), ("gsm8k", "main")]
    calls.clear()
    load_raw_dataset("gsm8k:socratic")
    assert calls == [("gsm8k", "socratic")]


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------


def test_make_splits_holds_out_seeded_fraction():
    ds = Dataset.from_dict(
        {"question": [f"q{i}" for i in range(200)], "answer": [str(i) for i in range(200)]}
    )
    train, valid = make_splits(DatasetDict({"train": ds}), valid_fraction=0.05, seed=0)
    train2, valid2 = make_splits(DatasetDict({"train": ds}), valid_fraction=0.05, seed=0)
    assert (len(train), len(valid)) == (190, 10)
    assert valid["question"] == valid2["question"] and train["question"] == train2["question"]
    assert not set(train["question"]) & set(valid["question"])
    assert set(train["question"]) | set(valid["question"]) == set(ds["question"])
    _, valid3 = make_splits(DatasetDict({"train": ds}), valid_fraction=0.05, seed=1)
    assert valid3["question"] != valid["question"]


def test_make_splits_prefers_existing_validation():
    a, b, c, d = (Dataset.from_dict({"x": [name]}) for name in "abcd")
    assert make_splits(DatasetDict({"train": a, "test": d, "validation": b, "valid": c}))[1]["x"] == ["b"]
    assert make_splits(DatasetDict({"train": a, "test": d, "valid": c}))[1]["x"] == ["c"]
    assert make_splits(DatasetDict({"train": a, "test": d}))[1]["x"] == ["d"]


def test_make_splits_single_other_split_and_errors():
    only_test = DatasetDict({"test": Dataset.from_dict({"x": list(range(40))})})
    train, valid = make_splits(only_test)
    assert (len(train), len(valid)) == (38, 2)
    with pytest.raises(ValueError, match="empty"):
        make_splits(DatasetDict({"train": Dataset.from_dict({"x": []})}))
    with pytest.raises(ValueError, match="no splits"):
        make_splits(DatasetDict())
    two = DatasetDict({"a": Dataset.from_dict({"x": [1]}), "b": Dataset.from_dict({"x": [2]})})
    with pytest.raises(ValueError, match="none is named 'train'"):
        make_splits(two)
    # an empty validation split is ignored: hold out from train instead
    train, valid = make_splits(
        DatasetDict(
            {"train": Dataset.from_dict({"x": list(range(20))}), "test": Dataset.from_dict({"x": []})}
        )
    )
    assert (len(train), len(valid)) == (19, 1)


# --------------------------------------------------------------------------------------------------
# Demo dataset
# --------------------------------------------------------------------------------------------------


def test_demo_arithmetic(tok):
    dsd = load_raw_dataset(data.DEMO_DATASET)
    again = make_demo_arithmetic()
    assert {k: len(v) for k, v in dsd.items()} == {"train": 2000, "test": 200}
    assert dsd["train"].column_names == ["question", "answer"]
    assert (
        dsd["train"].to_dict() == again["train"].to_dict()
        and dsd["test"].to_dict() == again["test"].to_dict()
    )
    assert not set(dsd["train"]["question"]) & set(dsd["test"]["question"])
    assert len(set(dsd["train"]["question"])) == 2000
    template = PromptTemplate()
    rows = dsd["train"].to_list() + dsd["test"].to_list()
    for row in rows:
        *work, final = row["answer"].split("\n")
        value = int(extract_final_answer(row["answer"]))
        assert final == f"#### {value}"
        for line in work:
            lhs, rhs = line.split(" = ")
            assert eval(lhs) == int(rhs)  # noqa: S307 - trusted generated arithmetic
            assert all(int(x) <= 10 for x in lhs.split()[::2])  # small operands: a fact table to learn
        assert int(work[-1].split(" = ")[1]) == value
    lengths = [
        len(ids_of(tok, template.render_prompt(r["question"]))) + len(ids_of(tok, r["answer"])) + 1
        for r in rows
    ]
    assert max(lengths) < 48


def test_noisy_demo_arithmetic_corrupts_only_training_results():
    """demo/arithmetic_noisy: the same questions and the same clean test split; exactly 30% of the training
    answers have a result off by one, in the work and the final answer alike (still well-formed, never negative)."""
    clean, noisy = make_demo_arithmetic(), load_raw_dataset(data.DEMO_NOISY_DATASET)
    assert noisy["test"].to_dict() == clean["test"].to_dict()
    assert noisy["train"]["question"] == clean["train"]["question"]
    changed = 0
    for right, given in zip(clean["train"]["answer"], noisy["train"]["answer"], strict=True):
        if right == given:
            continue
        changed += 1
        right_work, (work, final) = right.split("\n")[0], given.split("\n")
        lhs, result = work.split(" = ")
        assert lhs == right_work.split(" = ")[0] and abs(int(result) - eval(lhs)) == 1  # noqa: S307
        assert final == f"#### {result}" and int(result) >= 0
    assert changed == 600


def test_extract_final_answer():
    assert extract_final_answer(GSM8K_ROWS[0]["answer"]) == "72"
    assert extract_final_answer("so\n#### 1,234") == "1234"
    assert extract_final_answer("#### -3.5") == "-3.5"
    assert extract_final_answer("no marker 5") is None


# --------------------------------------------------------------------------------------------------
# Collate
# --------------------------------------------------------------------------------------------------


def test_sft_collate_shapes_padding_labels():
    examples = [
        {"input_ids": [10, 11, 12, 13, 14], "prompt_len": 2},
        {"input_ids": [20, 21, 22], "prompt_len": 1},
        {"input_ids": torch.tensor([30, 31]), "prompt_len": 0},
    ]
    batch = sft_collate(examples, pad_id=EOS_ID)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (3, 5),
        "attention_mask": (3, 5),
        "loss_mask": (3, 5),
        "labels": (3, 5),
        "prompt_len": (3,),
    }
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["loss_mask"].dtype == torch.float
    assert batch["input_ids"][1].tolist() == [20, 21, 22, EOS_ID, EOS_ID]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]
    assert batch["loss_mask"][0].tolist() == [0, 0, 1, 1, 1]
    assert batch["labels"][0].tolist() == [-100, -100, 12, 13, 14]
    assert batch["labels"][1].tolist() == [-100, 21, 22, -100, -100]
    assert batch["labels"][2].tolist() == [30, 31, -100, -100, -100]
    assert batch["prompt_len"].tolist() == [2, 1, 0]

    padded = sft_collate(examples, pad_id=0, pad_to=8)
    assert padded["input_ids"].shape == (3, 8) and padded["attention_mask"].sum().item() == 10
    with pytest.raises(ValueError, match="pad_to"):
        sft_collate(examples, pad_id=0, pad_to=4)


def test_collate_works_in_dataloader(tok):
    out, _ = build_sft_datasets("demo/arithmetic", tok, 64)[:2]
    sampler = LengthGroupedSampler(out["length"], batch_size=16, seed=0)
    loader = torch.utils.data.DataLoader(
        out, batch_size=16, sampler=sampler, collate_fn=lambda b: sft_collate(b, tok.pad_token_id)
    )
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 16
    assert (batch["labels"] != IGNORE_INDEX).sum() == batch["loss_mask"].sum()


# --------------------------------------------------------------------------------------------------
# LengthGroupedSampler
# --------------------------------------------------------------------------------------------------


def _lengths(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(1, 500, size=n).tolist()


@pytest.mark.parametrize(("n", "bs"), [(1000, 8), (1003, 8), (5, 8), (0, 4)])
def test_sampler_yields_each_index_once(n, bs):
    sampler = LengthGroupedSampler(_lengths(n), batch_size=bs, seed=3, group_size_multiplier=5)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        idx = list(sampler)
        assert sorted(idx) == list(range(n)) and len(sampler) == n


def test_sampler_deterministic_and_groups_lengths():
    lengths = _lengths(1000)
    a = LengthGroupedSampler(lengths, batch_size=10, seed=7, group_size_multiplier=10)
    b = LengthGroupedSampler(lengths, batch_size=10, seed=7, group_size_multiplier=10)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(LengthGroupedSampler(lengths, 10, seed=8)) != list(b)

    order = np.asarray(lengths)[list(a)].reshape(-1, 10)
    spread_grouped = (order.max(1) - order.min(1)).mean()
    shuffled = np.asarray(lengths)[np.random.default_rng(0).permutation(1000)].reshape(-1, 10)
    assert spread_grouped < 0.25 * (shuffled.max(1) - shuffled.min(1)).mean()
    assert order[0].max() == max(lengths)  # longest batch first


def test_sampler_ddp_shards_are_disjoint_and_cover():
    lengths, bs, world = _lengths(960), 8, 4  # divisible by the global batch of 32
    shards = [
        list(LengthGroupedSampler(lengths, bs, seed=1, num_replicas=world, rank=r, group_size_multiplier=3))
        for r in range(world)
    ]
    assert all(len(s) == 240 for s in shards)
    assert sorted(sum(shards, [])) == list(range(960))
    # step k of every rank comes from the same length-sorted global batch
    single = list(LengthGroupedSampler(lengths, bs * world, seed=1, group_size_multiplier=3))
    for step in range(len(shards[0]) // bs):
        from_ranks = sorted(sum((s[step * bs : (step + 1) * bs] for s in shards), []))
        assert from_ranks == sorted(single[step * bs * world : (step + 1) * bs * world])


def test_sampler_ddp_uneven_tail():
    lengths, bs, world = _lengths(1001), 8, 4
    shards = [
        list(LengthGroupedSampler(lengths, bs, seed=0, num_replicas=world, rank=r)) for r in range(world)
    ]
    sizes = {len(s) for s in shards}
    assert sizes == {len(LengthGroupedSampler(lengths, bs, num_replicas=world, rank=0))}
    assert len(sizes) == 1  # every rank takes the same number of steps
    assert set(sum(shards, [])) == set(range(1001))
    assert len(sum(shards, [])) - 1001 < world  # only the tail is padded
    dropped = [
        list(LengthGroupedSampler(lengths, bs, seed=0, num_replicas=world, rank=r, drop_last=True))
        for r in range(world)
    ]
    flat = sum(dropped, [])
    assert len(flat) == len(set(flat)) == 992 and all(len(s) == 248 for s in dropped)


def test_sampler_without_length_grouping():
    lengths = _lengths(100)
    plain = LengthGroupedSampler(lengths, 10, seed=2, group_by_length=False)
    idx = list(plain)
    assert sorted(idx) == list(range(100))
    assert idx == np.random.default_rng([2, 0]).permutation(100).tolist()
    ordered = list(LengthGroupedSampler(lengths, 10, shuffle=False, group_by_length=False))
    assert ordered == list(range(100))


def test_sampler_rejects_bad_args():
    with pytest.raises(ValueError, match="rank"):
        LengthGroupedSampler([1, 2], 1, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="batch_size"):
        LengthGroupedSampler([1, 2], 0)


# --------------------------------------------------------------------------------------------------
# End to end and pretraining data
# --------------------------------------------------------------------------------------------------


def test_build_sft_datasets_from_local_s1k(tmp_path, cache_dir, tok):
    rows = [dict(S1K_ROWS[i % 2], question=f"{S1K_ROWS[i % 2]['question']} #{i}") for i in range(40)]
    path = write_jsonl(tmp_path / "s1k.jsonl", rows)
    train, valid, spec, reports = build_sft_datasets(
        str(path),
        tok,
        256,
        question_field="question",
        thinking_field="gemini_thinking_trajectory",
        attempt_field="gemini_attempt",
        cache_dir=cache_dir,
    )
    assert spec.mode == "thinking"
    assert (len(train), len(valid)) == (38, 2)
    assert reports["train"].n_kept == 38 and reports["valid"].n_in == 2
    ex = valid[0]
    target = tok.decode(ex["input_ids"][ex["prompt_len"] : -1])
    assert target.startswith(" Thinking: ") and "\n\nAttempt: " in target


def test_pack_tokens(tok):
    docs = ["Hello world", "", "The quick brown fox jumps over the lazy dog.", None, "A\nB\nC"] * 7
    ds = Dataset.from_dict({"text": docs, "id": list(range(len(docs)))})
    stream: list[int] = []
    for d in docs:
        if d:
            stream += ids_of(tok, d) + [EOS_ID]
    packed = pack_tokens(ds, tok, block_size=16)
    assert packed.column_names == ["input_ids"]
    assert len(packed) == len(stream) // 16
    assert all(len(x) == 16 for x in packed["input_ids"])
    assert sum(packed["input_ids"], []) == stream[: len(packed) * 16]  # only the final remainder is dropped
    # blocks span map-batch boundaries (3 documents / 3 blocks per batch) without losing tokens
    small_batches = pack_tokens(ds, tok, block_size=5, batch_size=3)
    assert sum(small_batches["input_ids"], []) == stream[: len(stream) // 5 * 5]
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_tokens(ds, tok, block_size=10_000)


def test_load_text_corpus(tmp_path, cache_dir, tok):
    txt = tmp_path / "corpus.txt"
    txt.write_text("first line of text\nsecond line\n", encoding="utf-8")
    dsd = load_text_corpus(str(txt), cache_dir=cache_dir)
    assert dsd["train"]["text"] == ["first line of text", "second line"]
    assert (
        len(pack_tokens(dsd["train"], tok, block_size=4)) == (len(ids_of(tok, "first line of text")) + 4) // 4
    )
    with pytest.raises(ValueError, match=r"no 'body' column.*\['question', 'answer'\]"):
        load_text_corpus(
            str(write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS)), text_field="body", cache_dir=cache_dir
        )


def test_public_names_exist():
    for name in data.__all__:
        assert hasattr(data, name), name
    assert re.search(r"#### \d+", make_demo_arithmetic(5, 2)["train"][0]["answer"])
