"""run_sample.py and its library: prompted answers keep the prompt, stop at EOS and batch prompts of different
lengths; a seed fixes the tokens; a fine-tuned model's prompt template and canvas are found beside its weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import graph_lib
import noise_lib
import run_sample
from generation import DEFAULT_PROMPT_TEMPLATE, PromptFormat, encode_prompts, prompt_format, prompted_samples
from tests.tiny_models import (  # noqa: F401 (one_thread: autouse fixture)
    offline_env,
    one_thread,
    save_hub_model,
    tiny_sedd,
    token_preferring_sedd,
)
from tokenizer import EOS_ID, get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Hi",
    "What is 12 plus 30?",
    "Tom has 23 apples and buys 45 more. How many apples does Tom have now?",
]
FORMAT = PromptFormat(template="Question: {question}\nAnswer: ", max_length=48, pad_with_eos=True)


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


@pytest.fixture(scope="module")
def yes_id(tokenizer):
    return tokenizer(" yes", add_special_tokens=False)["input_ids"][0]


class Recorder(nn.Module):
    """Wraps a SEDD and keeps every token canvas the sampler shows it."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls: list[torch.Tensor] = []

    def forward(self, indices, sigma, attention_mask=None, output_mask=None, raw=False):
        self.calls.append(indices.clone())
        return self.inner(indices, sigma, attention_mask, output_mask=output_mask, raw=raw)


def graph_noise(model):
    return graph_lib.get_graph(model.config), noise_lib.get_noise(model.config)


def test_prompted_sampling_keeps_prompts_stops_at_eos_in_batches(tokenizer, yes_id):
    model = token_preferring_sedd({yes_id: 0.7, EOS_ID: 0.3})  # every free position: " yes" or EOS
    recorder = Recorder(model).eval()
    records = prompted_samples(
        recorder,
        *graph_noise(model),
        tokenizer,
        PROMPTS,
        FORMAT,
        steps=4,
        num_samples=2,
        batch_size=4,
        seed=0,
    )
    encoded = encode_prompts(tokenizer, PROMPTS, FORMAT.template)
    assert len({len(p) for p in encoded}) == 3  # three different prompt lengths
    jobs = [p for p in encoded for _ in range(2)]
    # two batches (4 + 2 rows); at every model call each row holds its own prompt, on the whole EOS-padded canvas
    assert {x.shape for x in recorder.calls} == {(4, FORMAT.max_length), (2, FORMAT.max_length)}
    for x in recorder.calls:
        rows = jobs[:4] if x.shape[0] == 4 else jobs[4:]
        for row, prompt in zip(x.tolist(), rows, strict=True):
            assert row[: len(prompt)] == prompt
    assert [(r["prompt"], r["sample"]) for r in records] == [(p, s) for p in PROMPTS for s in range(2)]
    for record in records:
        assert record["finished"]  # an EOS was generated and the answer stops before it
        assert set(record["tokens"]) <= {yes_id}
        assert record["completion"] == tokenizer.decode(record["tokens"])
    assert any(record["tokens"] for record in records)


def test_canvas_without_eos_padding_is_prompt_plus_budget(tokenizer, yes_id):
    model = token_preferring_sedd({yes_id: 1.0})  # never ends
    recorder = Recorder(model).eval()
    fmt = PromptFormat(template=FORMAT.template, max_length=64, pad_with_eos=False)
    records = prompted_samples(
        recorder, *graph_noise(model), tokenizer, PROMPTS, fmt, steps=4, max_new_tokens=5
    )
    longest = max(len(p) for p in encode_prompts(tokenizer, PROMPTS, fmt.template))
    assert {x.shape[1] for x in recorder.calls} == {longest + 5}  # shorter rows are padded, not longer
    for record in records:
        assert not record["finished"]  # EOS padding of a short row does not count as an EOS
        assert record["tokens"] == [yes_id] * 5


def test_same_seed_same_tokens_other_seed_differs(tokenizer):
    model = tiny_sedd(seed=1)
    graph, noise = graph_noise(model)

    def free(seed):
        records = run_sample.free_samples(model, graph, noise, tokenizer, n=3, length=16, steps=3, seed=seed)
        return [r["tokens"] for r in records]

    def prompted(seed):
        records = prompted_samples(model, graph, noise, tokenizer, PROMPTS[:2], FORMAT, steps=3, seed=seed)
        return [r["tokens"] for r in records]

    assert free(1) == free(1)
    assert free(1) != free(2)
    assert prompted(3) == prompted(3)
    assert prompted(3) != prompted(4)


def test_infilling_fixes_prefix_and_suffix(tokenizer):
    model = tiny_sedd()
    records = run_sample.free_samples(
        model, *graph_noise(model), tokenizer, n=2, length=16, steps=4, prefix="Once upon", suffix=" The end."
    )
    prefix = tokenizer("Once upon")["input_ids"]
    suffix = tokenizer(" The end.")["input_ids"]
    for record in records:
        assert len(record["tokens"]) == 16
        assert record["tokens"][: len(prefix)] == prefix and record["tokens"][-len(suffix) :] == suffix


def test_prompt_format_found_beside_weights(tmp_path):
    saved = {"prompt_template": "Q: {question}\nA: ", "max_length": 40, "pad_with_eos": True}
    hub = save_hub_model(tmp_path / "hub", sft_config=saved)
    assert prompt_format(hub, 64) == PromptFormat("Q: {question}\nA: ", 40, True)
    assert prompt_format(hub, 64, raw=True).template is None
    # a run directory: sft.py exports to <run>/hf_model/
    run = tmp_path / "run"
    save_hub_model(run / "hf_model", sft_config=saved)
    assert prompt_format(run, 64).max_length == 40
    # a run not yet exported: its run_config.yaml
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    sft = {"prompt_template": "In: {question}\nOut: ", "max_length": None, "pad_with_eos": False}
    (fresh / "run_config.yaml").write_text(yaml.safe_dump({"sft": sft}))
    assert prompt_format(fresh, 64) == PromptFormat("In: {question}\nOut: ", 64, False)
    # a model without settings (a pretrained model): the default template and the model's length
    plain = save_hub_model(tmp_path / "plain")
    assert prompt_format(plain, 64) == PromptFormat(DEFAULT_PROMPT_TEMPLATE, 64, False)


def test_read_prompts_file(tmp_path):
    lines = tmp_path / "prompts.txt"
    lines.write_text("first prompt\n\nsecond prompt\n")
    assert run_sample.read_prompts_file(lines) == ["first prompt", "second prompt"]
    rows = tmp_path / "prompts.jsonl"
    rows.write_text(
        json.dumps({"question": "q1", "answer": "a"}) + "\n" + json.dumps({"prompt": "q2"}) + "\n"
    )
    assert run_sample.read_prompts_file(rows) == ["q1", "q2"]
    rows.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match="no 'prompt' or 'question'"):
        run_sample.read_prompts_file(rows)


def test_cli_end_to_end(tmp_path, tokenizer, yes_id, capsys):
    saved = {"prompt_template": "Q: {question}\nA: ", "max_length": 40, "pad_with_eos": True}
    model_dir = save_hub_model(tmp_path / "model", token_preferring_sedd({yes_id: 0.7, EOS_ID: 0.3}), saved)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": q}) + "\n" for q in PROMPTS[:2]))
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "run_sample.py", "--model_path", str(model_dir), "--prompts_file", str(prompts),
               "--prompt", PROMPTS[2], "--num_samples", "2", "--steps", "4", "--seed", "0", "--format", "jsonl",
               "--output", str(out)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == [p for p in PROMPTS[2:] + PROMPTS[:2] for _ in range(2)]
    assert all(r["finished"] and set(r["tokens"]) <= {yes_id} for r in records)

    # unconditional / infilling, text to stdout (the original run_sample.py), in-process
    assert run_sample.main(["--model_path", str(model_dir), "--length", "12", "--steps", "3", "--batch_size", "2",
                            "--prefix", "Hello", "--suffix", " bye"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert printed.count("[sample ") == 2 and printed.count("Hello") == 2 and printed.count(" bye") == 2


def test_compile_flag_compiles_the_blocks_and_keeps_the_answers(tmp_path):
    """run_sample.py --compile: the transformer blocks go through torch.compile (inductor's CPU backend here),
    the state-dict names stay those of the checkpoint, and the same seed gives the eager model's answers."""
    from torch._dynamo.utils import counters

    model = tiny_sedd()
    names = list(model.state_dict())
    model_dir = save_hub_model(tmp_path / "model", model, {"max_length": 40, "pad_with_eos": True})
    tokens = {}
    torch._dynamo.reset()
    counters.clear()
    for flags in ([], ["--compile"]):
        out = tmp_path / f"answers{len(flags)}.jsonl"
        assert run_sample.main(["--model_path", str(model_dir), "--prompt", PROMPTS[1], "--num_samples", "2",
                                "--steps", "4", "--seed", "3", "--format", "jsonl", "--output", str(out),
                                *flags]) == 0  # fmt: skip
        tokens[bool(flags)] = [json.loads(line)["tokens"] for line in out.read_text().splitlines()]
    assert counters["stats"]["unique_graphs"] >= 1  # the blocks were compiled
    assert tokens[True] == tokens[False] and len(tokens[True]) == 2
    model.compile_blocks()
    assert list(model.state_dict()) == names
