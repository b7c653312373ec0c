"""Text generation with a SEDD model: prompted completions in batches, cut at the first EOS, and free
(unconditional or infilled) canvases; how a fine-tuned model wants to be prompted (`PromptFormat`).

Used by sft.py (validation samples), run_sample.py, evaluate.py and the RL rollouts.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

import sampling
from data import PromptTemplate
from recipe import EXPORT_DIR, RUN_CONFIG_NAME
from training import PRECISIONS

GENERATION_CONFIG_FILE = "sft_config.json"  # written beside the exported weights by sft.py
DEFAULT_PROMPT_TEMPLATE = PromptTemplate().prompt


@dataclass
class Completion:
    """One generated answer: its tokens (cut at EOS, EOS excluded), its text, and whether an EOS was produced."""

    tokens: list[int]
    text: str
    finished: bool


def cut_at_eos(tokens: Sequence[int], eos_id: int) -> tuple[list[int], bool]:
    tokens = list(tokens)
    if eos_id in tokens:
        return tokens[: tokens.index(eos_id)], True
    return tokens, False


@torch.no_grad()
def complete(
    model,
    graph,
    noise,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    max_length: int,
    steps: int,
    predictor: str = "analytic",
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    seed: int = 0,
    batch_size: int = 16,
    num_samples: int = 1,
    show_progress: bool = False,
) -> list[Completion]:
    """Complete token prompts; returns `len(prompts) * num_samples` completions, prompt-major.

    Each row of a batch is its own sequence of `min(max_length, len(prompt) + max_new_tokens)` tokens: the
    prompt at the start (fixed, never changed by the sampler), then generated positions; shorter rows are
    padded and the padding is hidden from attention, so a row's sequence does not depend on its batch.
    """
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    eos = tokenizer.eos_token_id
    jobs = [list(p) for p in prompts for _ in range(num_samples)]
    too_long = [i for i, p in enumerate(jobs) if len(p) >= max_length]
    if too_long:
        raise ValueError(
            f"{len(too_long)} prompt(s) have max_length={max_length} tokens or more (first: {len(jobs[too_long[0]])}); "
            "shorten them or raise the length."
        )
    results: list[Completion] = []
    batches = range(0, len(jobs), batch_size)
    for start in tqdm(batches, desc="generate", disable=not show_progress or len(batches) == 1):
        batch = jobs[start : start + batch_size]
        lengths = [min(max_length, len(p) + max_new_tokens) for p in batch]
        length = max(lengths)
        tokens, fixed = sampling.prompt_batch(
            batch, length, mask_id=graph.dim - 1, pad_id=eos, lengths=lengths
        )
        attention_mask = torch.arange(length)[None] < torch.tensor(lengths)[:, None]
        out = sampling.sample(
            model,
            graph,
            noise,
            fixed_tokens=tokens.to(device),
            fixed_mask=fixed.to(device),
            attention_mask=attention_mask.long().to(device) if min(lengths) < length else None,
            steps=steps,
            predictor=predictor,
            generator=generator,
            show_progress=show_progress and len(batches) == 1,
            autocast_dtype=PRECISIONS[precision],
        )
        for prompt, row, row_length in zip(batch, out.tolist(), lengths, strict=True):
            # the row ends at its own length: the EOS padding after it is not a generated EOS
            answer, finished = cut_at_eos(row[len(prompt) : row_length], eos)
            results.append(Completion(answer, tokenizer.decode(answer), finished))
    return results


def generate_from_token_prompts(model, graph, noise, tokenizer, prompts, **kwargs) -> list[str]:
    """`complete` returning the texts only."""
    return [c.text for c in complete(model, graph, noise, tokenizer, prompts, **kwargs)]


def write_jsonl(path: str | Path, records: Sequence[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


# ----------------------------------------------------------------------------- prompting a fine-tuned model
@dataclass(frozen=True)
class PromptFormat:
    """How to prompt a model the way it was fine-tuned. `template` is None for raw prompts; with
    `pad_with_eos` the model was trained on EOS-filled canvases of exactly `max_length` tokens;
    `thinking_template` renders thinking-mode targets (for likelihood evaluation)."""

    template: str | None
    max_length: int
    pad_with_eos: bool
    thinking_template: str = PromptTemplate().thinking_response

    def canvas(self, max_new_tokens: int) -> dict[str, int]:
        """`max_new_tokens`/`max_length` for `complete`: the whole `max_length` canvas when EOS-padded,
        else the prompt plus up to `max_new_tokens` (never beyond `max_length`)."""
        new = self.max_length if self.pad_with_eos else max_new_tokens
        return {"max_new_tokens": new, "max_length": self.max_length}

    def default_steps(self, max_new_tokens: int) -> int:
        """Sampler steps when none are asked for: one per position that may be generated."""
        return min(self.canvas(max_new_tokens).values())

    def sft_template(self) -> PromptTemplate:
        """The `data.PromptTemplate` that tokenizes SFT examples as in training (`{question}` when raw)."""
        return PromptTemplate(prompt=self.template or "{question}", thinking_response=self.thinking_template)


def add_compile_arg(parser: argparse.ArgumentParser) -> None:
    """run_sample.py's and evaluate.py's `--compile` (for `load_text_model`)."""
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the transformer blocks: on an H100 the sampler runs 1.26x faster "
        "(benchmarks/README.md); the first batch of each shape compiles (about a minute)",
    )


def load_text_model(model_path: str | Path, device: torch.device | str = "cpu", compile: bool = False):
    """`load_model.load_model` plus the GPT-2 tokenizer: `(model, graph, noise, tokenizer)`, the model in eval
    mode, its blocks compiled when `compile` (`SEDD.compile_blocks`). Raises ValueError when the model's
    vocabulary is not GPT-2's (its text cannot be decoded)."""
    from load_model import load_model
    from tokenizer import get_tokenizer

    model, graph, noise = load_model(model_path, device)
    tokenizer = get_tokenizer()
    if model.arch.tokens != len(tokenizer):
        raise ValueError(
            f"{model_path} has {model.arch.tokens} tokens but the GPT-2 tokenizer has {len(tokenizer)}; text "
            "generation and evaluation decode with GPT-2, so they need a model of the GPT-2 vocabulary."
        )
    if compile:
        model.compile_blocks()
    return model, graph, noise, tokenizer


def read_generation_config(model_path: str | Path) -> dict[str, Any] | None:
    """The generation settings saved with a fine-tuned model, or None for a model without them.

    Looks for `sft_config.json` in a hub-format directory, in `<run>/hf_model/` of a run directory, then in a
    run's `run_config.yaml` (`sft` section, for a run not yet exported), and in a hub repository.
    """
    path = Path(model_path).expanduser()
    if path.is_dir():
        for candidate in (path / GENERATION_CONFIG_FILE, path / EXPORT_DIR / GENERATION_CONFIG_FILE):
            if candidate.is_file():
                return json.loads(candidate.read_text(encoding="utf-8"))
        run_config = path / RUN_CONFIG_NAME
        if run_config.is_file():
            sft = (yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}).get("sft")
            if sft:
                keys = ("prompt_template", "thinking_template", "max_length", "pad_with_eos")
                return {k: sft.get(k) for k in keys}
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError

    try:
        return json.loads(Path(hf_hub_download(str(model_path), GENERATION_CONFIG_FILE)).read_text("utf-8"))
    except (EntryNotFoundError, HfHubHTTPError, HFValidationError):  # no such file, repo, or no network
        return None


def prompt_format(model_path: str | Path, model_length: int, raw: bool = False) -> PromptFormat:
    """The `PromptFormat` of the model at `model_path` (the default template and the model's length when it
    has no saved settings); `raw=True` drops the template."""
    config = read_generation_config(model_path) or {}
    template = config.get("prompt_template") or DEFAULT_PROMPT_TEMPLATE
    return PromptFormat(
        template=None if raw else template,
        max_length=int(config.get("max_length") or model_length),
        pad_with_eos=bool(config.get("pad_with_eos", False)),
        thinking_template=config.get("thinking_template") or PromptTemplate().thinking_response,
    )


def encode_prompts(tokenizer, texts: Sequence[str], template: str | None) -> list[list[int]]:
    """Token ids of `texts` rendered in `template` (its `{question}` replaced), tokenized as in SFT training."""
    if template is not None:
        render = PromptTemplate(prompt=template).render_prompt
        texts = [render(text) for text in texts]
    return tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]


def prompted_samples(
    model,
    graph,
    noise,
    tokenizer,
    prompts: Sequence[str],
    fmt: PromptFormat,
    *,
    steps: int,
    max_new_tokens: int = 256,
    num_samples: int = 1,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """`num_samples` answers to each text prompt (prompt-major), rendered and laid out as `fmt` says, in
    batches; other keyword arguments go to `complete`. One record per answer: the prompt, the sample index,
    the answer cut at the first EOS, its tokens and whether an EOS ended it."""
    completions = complete(
        model,
        graph,
        noise,
        tokenizer,
        encode_prompts(tokenizer, prompts, fmt.template),
        **fmt.canvas(max_new_tokens),
        steps=steps,
        num_samples=num_samples,
        **kwargs,
    )
    return [
        {
            "prompt": prompts[i // num_samples],
            "sample": i % num_samples,
            "completion": c.text,
            "finished": c.finished,
            "tokens": c.tokens,
        }
        for i, c in enumerate(completions)
    ]


# ----------------------------------------------------------------------------- free canvases
@torch.no_grad()
def sample_canvases(
    model,
    graph,
    noise,
    *,
    n: int,
    length: int,
    steps: int,
    prefix: Sequence[int] = (),
    suffix: Sequence[int] = (),
    predictor: str = "analytic",
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    seed: int = 0,
    batch_size: int = 16,
    show_progress: bool = False,
) -> torch.Tensor:
    """`n` sampled sequences [n, length] on the CPU: unconditional, or infilled between a fixed `prefix` (at the
    start) and a fixed `suffix` (at the end of the canvas), as the original repo's run_sample(_cond).py."""
    if len(prefix) + len(suffix) >= length:
        raise ValueError(
            f"prefix ({len(prefix)} tokens) and suffix ({len(suffix)} tokens) leave no room in a canvas of "
            f"{length} tokens; raise the length or shorten them."
        )
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    rows: list[torch.Tensor] = []
    batches = range(0, n, batch_size)
    for start in tqdm(batches, desc="sample", disable=not show_progress or len(batches) == 1):
        size = min(batch_size, n - start)
        tokens, fixed = sampling.prompt_batch(  # full-length rows: no padding, so pad_id is never used
            [list(prefix)] * size, length, mask_id=graph.dim - 1, pad_id=0, suffixes=[list(suffix)] * size
        )
        out = sampling.sample(
            model,
            graph,
            noise,
            fixed_tokens=tokens.to(device),
            fixed_mask=fixed.to(device),
            steps=steps,
            predictor=predictor,
            generator=generator,
            show_progress=show_progress and len(batches) == 1,
            autocast_dtype=PRECISIONS[precision],
        )
        rows.append(out.cpu())
    return torch.cat(rows)
