"""Evaluate a SEDD model: answer accuracy, the likelihood bound on data, and generative perplexity.

    python evaluate.py --model_path exp_local/demo/sft --dataset demo/arithmetic --split test --limit 200 \\
        --output exp_local/demo/eval.json                         # accuracy + likelihood (the default modes)
    python evaluate.py --mode accuracy --model_path <run dir> --dataset gsm8k --num_samples 8 --pass_k 1 8
    python evaluate.py --mode likelihood --model_path louaaron/sedd-small \\
        --dataset Salesforce/wikitext:wikitext-103-raw-v1 --split test --n_t 8
    python evaluate.py --mode genppl --model_path louaaron/sedd-small --eval_model gpt2-large --steps 1024
    python evaluate.py --mode accuracy --model_path exp_local/demo/sft --dataset demo/arithmetic --limit 200 \
        --guidance svdd --guidance_candidates 4 --reward format --reward_kwargs '{"pattern": "####"}'

Modes:
  accuracy    answers to the split's questions (in the model's SFT prompt template), final answers extracted
              (`#### N`, `\\boxed{}`, `Attempt:`, last number) and compared with the reference answer extracted
              the same way; majority vote and unbiased pass@k over `--num_samples` samples. With `--guidance`
              the answers are reward-guided (rl/guidance.py; an exact_match reward sees the reference answer,
              so it measures an oracle-guided upper bound, not the model alone).
  likelihood  the negative ELBO per token and its perplexity bound, averaged over `--n_t` seeded t-samples per
              sequence (two runs agree): per response token on Q&A data (the prompt conditions), per token
              on plain text (packed into blocks of the model's length).
  genppl      perplexity of unconditional samples under a causal LM (`--eval_model`, GPT-2 large as in the
              paper, or any local directory of a HuggingFace causal LM).
The library pieces are in answers.py, likelihood.py and generation.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import data
import recipe
import utils
from answers import extract_answer, grade_samples, summarize_grades
from generation import (
    PromptFormat,
    add_compile_arg,
    encode_prompts,
    load_text_model,
    prompt_format,
    sample_canvases,
)
from likelihood import causal_lm_nll, load_causal_lm, negative_elbo, sft_batches, text_batches
from rl.guidance import add_guidance_args, check_guidance_args, guidance_from_args, prompted_answers
from training import PRECISIONS, resolve_precision

logger = logging.getLogger("evaluate")
MODES = ("accuracy", "likelihood", "genppl")


# ----------------------------------------------------------------------------- the three evaluations
def evaluate_accuracy(
    model, graph, noise, tokenizer, rows, spec: data.FieldSpec, fmt: PromptFormat, args, **run
):
    """Summary and per-example results (prompt, reference, completions, answers, correct flags)."""
    if spec.mode == "text":
        raise ValueError(
            f"Accuracy needs question and answer fields; the dataset resolved to {spec.describe()}. Set "
            "--question_field and --response_field (or --attempt_field), or use --mode likelihood."
        )
    questions = [str(q) for q in rows[spec.question]]
    reference_texts = [str(r) for r in rows[spec.attempt or spec.response]]
    prompt_lengths = [len(p) for p in encode_prompts(tokenizer, questions, fmt.template)]
    fits = [n < fmt.max_length for n in prompt_lengths]
    if not all(fits):
        logger.warning(
            f"Skipping {fits.count(False)} question(s) whose prompt fills the {fmt.max_length}-token canvas "
            f"(longest {max(prompt_lengths)} tokens); they are not graded."
        )
        questions = [q for q, ok in zip(questions, fits, strict=True) if ok]
        reference_texts = [r for r, ok in zip(reference_texts, fits, strict=True) if ok]
    if not questions:
        raise ValueError(f"No question fits the model's {fmt.max_length}-token canvas; nothing to grade.")
    ks = sorted(set(args.pass_k or (1, args.num_samples)))
    records = prompted_answers(
        model,
        graph,
        noise,
        tokenizer,
        questions,
        fmt,
        guidance_from_args(args),
        {"answer": reference_texts},
        steps=args.steps or fmt.default_steps(args.max_new_tokens),
        max_new_tokens=args.max_new_tokens,
        num_samples=args.num_samples,
        predictor=args.predictor,
        batch_size=args.batch_size,
        show_progress=True,
        **run,
    )
    examples, grades = [], []
    for i, (question, reference_text) in enumerate(zip(questions, reference_texts, strict=True)):
        samples = records[i * args.num_samples : (i + 1) * args.num_samples]
        reference = extract_answer(reference_text)
        grade = grade_samples([s["completion"] for s in samples], reference, ks)
        grades.append(grade)
        examples.append(
            {
                "prompt": question,
                "reference_text": reference_text,
                "reference": reference,
                "completions": [s["completion"] for s in samples],
                "finished": [s["finished"] for s in samples],
                "answers": grade.answers,
                "correct": grade.correct,
                "majority": grade.majority,
                "majority_correct": grade.majority_correct,
            }
        )
    summary = summarize_grades(grades)
    summary["finished"] = sum(r["finished"] for r in records) / len(records)
    if "reward" in records[0]:  # reward-guided: the mean guiding reward of the answers
        summary["guidance_reward"] = sum(r["reward"] for r in records) / len(records)
    summary["skipped_too_long"] = fits.count(False)
    summary["no_reference"] = sum(e["reference"] is None for e in examples)
    if summary["no_reference"]:
        logger.warning(
            f"{summary['no_reference']} reference answer(s) could not be extracted; they count as wrong."
        )
    return {"summary": summary, "examples": examples}


def evaluate_likelihood(
    model, graph, noise, tokenizer, rows, spec: data.FieldSpec, fmt: PromptFormat, args, **run
):
    """Negative ELBO per response token (Q&A data, prompt conditioning) or per token (plain text)."""
    if spec.mode == "text":
        length = args.length or model.arch.length
        blocks = data.pack_tokens(rows, tokenizer, length, text_field=spec.text)
        batches, n_batches, unit, info = (
            text_batches(blocks, args.batch_size),
            None,
            "token",
            {"block": length},
        )
    else:
        examples, report = data.tokenize_sft_dataset(
            rows, spec, tokenizer, fmt.max_length, fmt.sft_template(), name=args.split
        )
        pad_to = fmt.max_length if fmt.pad_with_eos else None
        batches = sft_batches(examples, args.batch_size, tokenizer.eos_token_id, pad_to)
        n_batches, unit, info = (
            -(-len(examples) // args.batch_size),
            "response token",
            {"data": report.summary()},
        )
    result = negative_elbo(
        model,
        graph,
        noise,
        batches,
        n_t=args.n_t,
        sampling_eps=args.sampling_eps,
        total=n_batches,
        show_progress=True,
        **run,
    )
    return {**result.as_dict(), "unit": unit, **info}


def evaluate_genppl(model, graph, noise, tokenizer, causal_lm, args, **run) -> dict[str, Any]:
    """Perplexity of `--genppl_samples` unconditional samples under `causal_lm` = (model, its tokenizer)."""
    lm, lm_tokenizer = causal_lm
    length = args.length or model.arch.length
    tokens = sample_canvases(
        model,
        graph,
        noise,
        n=args.genppl_samples,
        length=length,
        steps=args.steps or length,
        predictor=args.predictor,
        batch_size=args.batch_size,
        show_progress=True,
        **run,
    )
    texts = tokenizer.batch_decode(tokens.tolist())
    result = causal_lm_nll(
        texts, lm, lm_tokenizer, batch_size=args.batch_size, device=run["device"], show_progress=True
    )
    return {
        "eval_model": str(args.eval_model),
        "gen_perplexity": result.perplexity_bound,
        "nats_per_token": result.nats_per_token,
        "tokens": result.tokens,
        "length": length,
        "samples": texts,
    }


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate a SEDD model: accuracy, likelihood bound, generative perplexity.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--mode", nargs="+", choices=MODES, default=["accuracy", "likelihood"], help="what to evaluate")
    add("--model_path", required=True, help="hub id, hub-format directory or training run directory")
    add(
        "--dataset",
        default=None,
        help="hub dataset (name or name:config), local file/dir, or demo/arithmetic",
    )
    add("--split", default="test", help="dataset split to evaluate on")
    add("--limit", type=int, default=None, help="evaluate the first N examples (rows) of the split only")
    add("--output", default=None, help="write every result (per example too) to this JSON file")
    add("--question_field", default=None, help="question column (None: auto-detect `question`)")
    add("--response_field", default=None, help="answer/solution column (None: auto-detect answer, solution)")
    add("--thinking_field", default=None, help="reasoning-trace column (thinking-mode SFT data)")
    add("--attempt_field", default=None, help="final-attempt column (thinking mode; holds the reference)")
    add("--text_field", default=data.DEFAULT_TEXT_FIELD, help="text column of a plain-text corpus")
    add("--raw_prompt", action="store_true", help="use questions as given, without the SFT prompt template")
    add("--num_samples", type=int, default=1, help="accuracy: answers sampled per question")
    add(
        "--pass_k",
        type=int,
        nargs="+",
        default=None,
        help="accuracy: k of pass@k (None: 1 and --num_samples)",
    )
    add(
        "--steps", type=int, default=None, help="sampler steps (None: one per position that may be generated)"
    )
    add("--predictor", choices=["analytic", "euler"], default="analytic", help="sampler reverse-step rule")
    add("--max_new_tokens", type=int, default=256, help="answer budget (EOS-padded models fill their canvas)")
    add("--n_t", type=int, default=8, help="likelihood: t-samples per sequence")
    add("--sampling_eps", type=float, default=1e-3, help="likelihood: t ~ U(eps, 1), as in training")
    add(
        "--length", type=int, default=None, help="likelihood block / genppl sample length (None: the model's)"
    )
    add("--eval_model", default="gpt2-large", help="genppl: causal LM (hub id in the cache, or a directory)")
    add("--genppl_samples", type=int, default=32, help="genppl: unconditional samples to score")
    add("--batch_size", type=int, default=16, help="sequences per forward pass")
    add("--seed", type=int, default=0, help="seed of the samples and of the likelihood's t-draws")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add("--precision", choices=["auto", *PRECISIONS], default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    add_compile_arg(parser)
    add_guidance_args(parser)  # accuracy: reward-guided answers (--guidance svdd|best_of_n --reward ...)
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Cross-flag checks; each error says how to fix the command."""
    for name in (
        "limit",
        "num_samples",
        "steps",
        "max_new_tokens",
        "n_t",
        "length",
        "genppl_samples",
        "batch_size",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name}={value} must be at least 1.")
    if {"accuracy", "likelihood"} & set(args.mode) and not args.dataset:
        parser.error(f"--mode {' '.join(args.mode)} needs --dataset (e.g. --dataset demo/arithmetic).")
    check_guidance_args(parser, args)
    if args.guidance != "none" and "accuracy" not in args.mode:
        parser.error("--guidance steers the answers of --mode accuracy; add accuracy to --mode or drop it.")
    too_big = [k for k in args.pass_k or () if not 1 <= k <= args.num_samples]
    if too_big:
        parser.error(f"--pass_k {too_big} must lie in [1, --num_samples={args.num_samples}]; sample more.")


def load_split(args: argparse.Namespace) -> tuple[Any, data.FieldSpec]:
    """The first `--limit` rows of `--split` of `--dataset`, and which columns are question and answer."""
    splits = data.load_raw_dataset(args.dataset)
    if args.split not in splits:
        raise ValueError(
            f"{args.dataset} has splits {list(splits)}, not {args.split!r}; choose one with --split."
        )
    rows = splits[args.split]
    rows = rows.select(range(min(args.limit, len(rows)))) if args.limit else rows
    spec = data.resolve_fields(
        rows.column_names,
        text_field=args.text_field,
        question_field=args.question_field,
        response_field=args.response_field,
        thinking_field=args.thinking_field,
        attempt_field=args.attempt_field,
    )
    return rows, spec


def print_summary(results: dict[str, Any]) -> None:
    if "accuracy" in results:
        s = results["accuracy"]["summary"]
        passes = " ".join(f"{k} {v:.4f}" for k, v in s.items() if k.startswith("pass@"))
        print(
            f"accuracy: {s['accuracy']:.4f} (majority vote) | {passes} | answered {s['answered']:.3f} | "
            f"finished {s['finished']:.3f} | {s['examples']} examples"
        )
    if "likelihood" in results:
        r = results["likelihood"]
        print(
            f"likelihood: {r['nats_per_token']:.4f} nats per {r['unit']} (negative ELBO), perplexity <= "
            f"{r['perplexity_bound']:.3f} | n_t={r['n_t']}, {r['sequences']} sequences, {r['tokens']} tokens"
        )
    if "genppl" in results:
        r = results["genppl"]
        print(
            f"genppl: {r['gen_perplexity']:.3f} under {r['eval_model']} ({len(r['samples'])} samples of {r['length']} tokens)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    device = utils.resolve_device(args.device)
    run = {"device": device, "precision": resolve_precision(args.precision, device), "seed": args.seed}
    torch.manual_seed(args.seed)
    model, graph, noise, tokenizer = load_text_model(args.model_path, device, compile=args.compile)

    modes = [m for m in MODES if m in args.mode]
    # load the causal LM first: a missing one fails the run now, not after the sampling
    causal_lm = load_causal_lm(args.eval_model, device) if "genppl" in modes else None
    jobs: dict[str, Callable[[], dict[str, Any]]] = {}
    if {"accuracy", "likelihood"} & set(modes):
        rows, spec = load_split(args)
        fmt = prompt_format(args.model_path, model.arch.length, raw=args.raw_prompt)
        logger.info(f"{args.dataset}[{args.split}]: {len(rows)} rows, fields {spec.describe()}, format {fmt}")
        if spec.mode == "text" and "accuracy" in modes and args.mode == parser.get_default("mode"):
            logger.info("Plain-text data: no answers to grade, evaluating the likelihood only.")
            modes.remove("accuracy")
        task = (model, graph, noise, tokenizer, rows, spec, fmt, args)
        jobs["accuracy"] = lambda: evaluate_accuracy(*task, **run)
        jobs["likelihood"] = lambda: evaluate_likelihood(*task, **run)
    jobs["genppl"] = lambda: evaluate_genppl(model, graph, noise, tokenizer, causal_lm, args, **run)

    results: dict[str, Any] = {"model_path": str(args.model_path), "settings": vars(args)}
    for mode in modes:
        results[mode] = jobs[mode]()
        if args.output:  # after every mode, so that a later failure keeps the finished results
            path = Path(args.output)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
            logger.info(f"Wrote {mode} results to {path}")
    print_summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(recipe.user_errors_exit(main)(sys.argv[1:]))  # fixable errors: their message and exit code 1
