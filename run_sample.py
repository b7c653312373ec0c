"""Generate text with a SEDD model: unconditional, infilled, or answers to prompts.

    python run_sample.py --model_path louaaron/sedd-small --steps 1024 --batch_size 4        # as the original
    python run_sample.py --model_path louaaron/sedd-small --prefix "Once upon a time" --suffix "The end."
    python run_sample.py --model_path exp_local/sft/simplescaling/s1K-1.1/2024.01.15/120000 \\
        --prompt "What is 2 + 3?" --num_samples 4 --format jsonl --output answers.jsonl
    python run_sample.py --model_path exp_local/demo/sft --prompts_file questions.jsonl --seed 1
    python run_sample.py --model_path exp_local/demo/sft --prompts_file questions.jsonl \
        --guidance svdd --guidance_candidates 4 --reward exact_match     # JSONL rows with an `answer` field

`--model_path` is a hub id, a hub-format directory or a training run directory (its latest checkpoint, EMA
weights). Prompts are rendered in the prompt template the model was fine-tuned with (`sft_config.json` beside
its weights; the default `Question: {question}\\nAnswer: ` otherwise; `--raw_prompt` uses them as given) and
answers are cut at the first EOS. A model fine-tuned with `pad_with_eos` samples its whole training canvas;
otherwise the canvas is the prompt plus `--max_new_tokens`. The same `--seed` gives the same tokens on the
same device. `--guidance svdd|best_of_n` steers prompted answers with a reward (rl/guidance.py), no retraining.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import recipe
import utils
from generation import add_compile_arg, load_text_model, prompt_format, sample_canvases
from rl.guidance import add_guidance_args, check_guidance_args, guidance_from_args, prompted_answers
from training import PRECISIONS, resolve_precision

logger = logging.getLogger("run_sample")


# ----------------------------------------------------------------------------- library
def read_prompts_file(path: str | Path) -> list[str]:
    """Prompts from a file: JSONL (`.jsonl`/`.json`) rows with a `prompt` or `question` field, else one
    prompt per non-empty line."""
    return read_prompt_rows(path)[0]


def read_prompt_rows(path: str | Path) -> tuple[list[str], dict[str, list[Any]]]:
    """`read_prompts_file`'s prompts and, for JSONL, the rows' other fields that every row has (e.g. the
    reference `answer` a guiding reward compares with): `{field: [value per prompt]}`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts_file {path} does not exist.")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix not in (".jsonl", ".json"):
        return lines, {}
    prompts, rows = [], []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}:{number} is not valid JSON ({err}); write one JSON object per line."
            ) from err
        field = next((k for k in ("prompt", "question") if isinstance(row, dict) and k in row), None)
        if field is None:
            raise ValueError(f"{path}:{number} has no 'prompt' or 'question' field: {line[:200]}")
        prompts.append(str(row[field]))
        rows.append({k: v for k, v in row.items() if k != field})
    shared = set.intersection(*(set(r) for r in rows)) if rows else set()
    return prompts, {k: [r[k] for r in rows] for k in sorted(shared)}


def free_samples(
    model,
    graph,
    noise,
    tokenizer,
    *,
    n: int,
    length: int,
    steps: int,
    prefix: str = "",
    suffix: str = "",
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """`n` unconditional samples of `length` tokens, or infilled between `prefix` and `suffix` texts; other
    keyword arguments go to `generation.sample_canvases`. One record per sample: its text and tokens."""
    prefix_ids, suffix_ids = (
        tokenizer(t, add_special_tokens=False)["input_ids"] if t else [] for t in (prefix, suffix)
    )
    tokens = sample_canvases(
        model, graph, noise, n=n, length=length, steps=steps, prefix=prefix_ids, suffix=suffix_ids, **kwargs
    )
    return [
        {"sample": i, "text": tokenizer.decode(row), "tokens": row} for i, row in enumerate(tokens.tolist())
    ]


def format_text(records: Sequence[dict[str, Any]]) -> str:
    """Human-readable samples: each answer under its prompt, or each free sample, separated by rules."""
    rule = "=" * 80
    blocks = []
    for record in records:
        if "prompt" in record:
            end = "" if record["finished"] else " [no EOS]"
            blocks.append(
                f"{rule}\n[prompt] {record['prompt']}\n[sample {record['sample']}]{end}\n{record['completion']}"
            )
        else:
            blocks.append(f"{rule}\n[sample {record['sample']}]\n{record['text']}")
    return "\n".join(blocks) + f"\n{rule}\n"


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Sample from a SEDD model: unconditional, infilling (--prefix/--suffix) or prompted.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--model_path", default="louaaron/sedd-small", help="hub id, hub-format directory or run directory")
    add("--steps", type=int, default=None, help="sampler steps; None: one per position that may be generated")
    add(
        "--batch_size",
        type=int,
        default=None,
        help="rows per forward pass; None: 1 unconditional, 16 prompted",
    )
    add("--length", type=int, default=None, help="canvas tokens; None: the model's length (prompted: a cap)")
    add("--predictor", choices=["analytic", "euler"], default="analytic", help="the reverse-step rule")
    add("--prefix", default="", help="infilling: text fixed at the start of the canvas")
    add("--suffix", default="", help="infilling: text fixed at the end of the canvas")
    add("--prompt", action="append", default=[], help="a prompt to answer (repeatable)")
    add("--prompts_file", default=None, help="prompts: one per line, or JSONL with a prompt/question field")
    add("--raw_prompt", action="store_true", help="use the prompts as given, without the prompt template")
    add("--max_new_tokens", type=int, default=256, help="answer budget (EOS-padded models fill their canvas)")
    add(
        "--num_samples",
        type=int,
        default=None,
        help="per prompt (None: 1); unconditional: in total (None: batch)",
    )
    add("--seed", type=int, default=0, help="random seed: the same seed gives the same tokens on a device")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add("--precision", choices=["auto", *PRECISIONS], default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    add("--format", choices=["text", "jsonl"], default="text", help="output format")
    add_compile_arg(parser)
    add("--output", default=None, help="write the samples to this file instead of stdout")
    add_guidance_args(parser)  # prompted answers: reward-guided (--guidance svdd|best_of_n --reward ...)
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Cross-flag checks; each error says how to fix the command."""
    for name in ("steps", "batch_size", "length", "num_samples", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name}={value} must be at least 1.")
    if (args.prompt or args.prompts_file) and (args.prefix or args.suffix):
        parser.error("--prefix/--suffix are for infilling without prompts; drop them or the prompts.")
    check_guidance_args(parser, args)
    if args.guidance != "none" and not (args.prompt or args.prompts_file):
        parser.error("--guidance steers answers to prompts; give --prompt or --prompts_file.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    device = utils.resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    torch.manual_seed(args.seed)

    model, graph, noise, tokenizer = load_text_model(args.model_path, device, compile=args.compile)
    common = dict(
        predictor=args.predictor,
        device=device,
        precision=precision,
        seed=args.seed,
        show_progress=True,
    )
    prompts, fields = list(args.prompt), {}
    if args.prompts_file:
        file_prompts, fields = read_prompt_rows(args.prompts_file)
        if args.prompt and fields:  # --prompt rows have no fields: the guiding reward gets none
            fields = {}
        prompts += file_prompts
    if prompts:
        fmt = prompt_format(args.model_path, model.arch.length, raw=args.raw_prompt)
        if args.length is not None and fmt.pad_with_eos and args.length != fmt.max_length:
            logger.warning(
                f"--length={args.length} ignored: this model was fine-tuned on EOS-filled canvases "
                f"of exactly {fmt.max_length} tokens, which it samples."
            )
        elif args.length is not None:
            fmt = replace(fmt, max_length=args.length)
        canvas = fmt.canvas(args.max_new_tokens)
        logger.info(f"{len(prompts)} prompt(s), template {fmt.template!r}, canvas {canvas}")
        records = prompted_answers(
            model,
            graph,
            noise,
            tokenizer,
            prompts,
            fmt,
            guidance_from_args(args),
            fields,
            steps=args.steps or fmt.default_steps(args.max_new_tokens),
            max_new_tokens=args.max_new_tokens,
            num_samples=args.num_samples or 1,
            batch_size=args.batch_size or 16,
            **common,
        )
    else:
        length = args.length or model.arch.length
        records = free_samples(
            model,
            graph,
            noise,
            tokenizer,
            n=args.num_samples or args.batch_size or 1,
            batch_size=args.batch_size or 1,
            length=length,
            steps=args.steps or length,
            prefix=args.prefix,
            suffix=args.suffix,
            **common,
        )

    if args.format == "text":
        text = format_text(records)
    else:
        text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text, encoding="utf-8")
        logger.info(f"Wrote {len(records)} sample(s) to {args.output}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(recipe.user_errors_exit(main)(sys.argv[1:]))  # fixable errors: their message and exit code 1
