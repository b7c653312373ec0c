"""Measured gains of RL on the offline demo: held-out accuracy of the SFT start, after each trained method (ReFT,
reward-weighted denoising, policy gradient, DPO on online pairs), after a continued-SFT control with the same
updates, and with reward-guided sampling (SVDD, best-of-N) of the start, on the same test prompts with the same
seed and sampler steps.

    python sft.py experiment=demo hydra.run.dir=exp_local/demo/sft     # the start (`make demo`)
    python benchmarks/rl_demo.py --threads 2                            # everything
    python benchmarks/rl_demo.py --methods sft sft_continued reft --num_samples 4   # a part of it
    python benchmarks/rl_demo.py --task noisy            # from a start fine-tuned on noisy answers (make demo-noisy)
    python benchmarks/rl_demo.py --rescore exp_local/demo/rl_benchmark/results.json  # a finished run's table again

Every number comes from the real entrypoints, whose exact commands the script prints and records: `run_rl.py
experiment=rl_demo rl/method=...` (the configs/experiment/rl_demo.yaml defaults) trains the RL rows, `sft.py
experiment=demo` continued from the start with the same number of updates, batch size, lr and EMA is the
control (an RL row gains only where it beats it), `evaluate.py --mode accuracy` measures the exported model on
the first `--prompts` questions of demo/arithmetic's test split (never trained on), `--num_samples` answers each
(`sample_accuracy`: the mean over all answers). Guided rows steer the start's sampler with a reward:
`exact_match` sees the reference answer (an oracle verifier: an upper bound, not the model's own accuracy),
`consistent_arithmetic` checks that the worked equations are true and end in the `#### N` answer (no
reference: a verifier, not an oracle), `format` only checks for a well-formed `#### N` line. The table and
every command, wall time and result go to `--out`/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's modules (rl.rewards) when run as benchmarks/rl_demo.py

from omegaconf import OmegaConf  # noqa: E402

from rl.rewards import answer_follows_work, format_reward  # noqa: E402

FORMAT_PATTERN = r"####\s*-?\d+\s*$"

# name -> (what it is, evaluate.py flags beyond the common ones); "model" is the start or a trained run
ROWS = {
    "sft": ("SFT start", []),
    "sft_continued": ("control: SFT continued with the RL rows' updates, batch, lr and EMA", []),
    "reft": ("ReFT (run_rl.py rl/method=reft)", []),
    "rwd": ("reward-weighted denoising (rl/method=rwd)", []),
    "pg": ("policy gradient (rl/method=pg)", []),
    "dpo_online": ("DPO on online pairs (rl/method=dpo)", []),
    "svdd": ("SFT + SVDD guidance, exact_match (oracle), N=4", ["--guidance", "svdd"]),
    "best_of_n": ("SFT + best-of-4, exact_match (oracle)", ["--guidance", "best_of_n"]),
    "svdd_consistent": (
        "SFT + SVDD guidance, consistent_arithmetic (no reference), N=4",
        ["--guidance", "svdd", "--reward", "consistent_arithmetic"],
    ),
    "svdd_format": (
        "SFT + SVDD guidance, format reward, N=4",
        [
            "--guidance",
            "svdd",
            "--reward",
            "format",
            "--reward_kwargs",
            json.dumps({"pattern": FORMAT_PATTERN}),
        ],
    ),
}


# task -> (its RL experiment config, the start's SFT dataset, the start's default run directory). "clean": the
# demo as generated (reward checked_arithmetic); "noisy": the start fine-tuned on answers 30% off by one, RL
# against a verifier (consistent_arithmetic) that needs no reference. Both are evaluated on the same clean test split.
TASKS = {
    "clean": ("rl_demo", "demo/arithmetic", "exp_local/demo/sft"),
    "noisy": ("rl_demo_noisy", "demo/arithmetic_noisy", "exp_local/demo/sft_noisy"),
}


def continued_sft_overrides(task: str = "clean") -> list[str]:
    """The control row: the demo SFT recipe continued from the start on the start's own SFT data with the RL rows'
    number of updates, batch size, learning rate (constant, no warmup) and EMA, read from
    configs/experiment/rl_demo.yaml. An RL gain counts only where it beats this: the same updates on the
    reference answers instead of the method's data."""
    rl_demo = OmegaConf.load(ROOT / "configs" / "experiment" / "rl_demo.yaml")
    n_iters = rl_demo.training.n_iters
    return [
        "experiment=demo",
        f"sft.dataset={TASKS[task][1]}",
        f"training.n_iters={n_iters}",
        f"training.batch_size={rl_demo.training.batch_size}",
        f"training.ema={rl_demo.training.ema}",
        f"optim.lr={rl_demo.optim.lr}",
        "optim.warmup=0",
        "optim.schedule=constant",
        f"training.eval_freq={n_iters}",
        f"training.snapshot_freq={n_iters}",
    ]


def trained_rows(task: str = "clean") -> dict[str, tuple[str, list[str]]]:
    """The trained rows of `task`: name -> (entrypoint, overrides); the RL rows are `run_rl.py
    experiment=rl_demo[_noisy] rl/method=...` (the experiment's defaults are ReFT's)."""
    experiment = TASKS[task][0]
    rows = {"sft_continued": ("sft.py", continued_sft_overrides(task))}
    for name, method in (("reft", "reft"), ("rwd", "rwd"), ("pg", "pg"), ("dpo_online", "dpo")):
        rows[name] = ("run_rl.py", [f"experiment={experiment}", f"rl/method={method}"])
    return rows


def run(command: list[str], log: Path, threads: int | None) -> float:
    """Run `command` from the repository root (offline), its output to `log`; the wall time in seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    print(f"$ {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"failed (exit {done.returncode}) after {wall:.0f} s; see {log}")
    print(f"  {wall:.0f} s", flush=True)
    return wall


def train(name: str, row: tuple[str, list[str]], out: Path, args: argparse.Namespace) -> dict:
    """Trained row `name` = (entrypoint, overrides) run from the start; the run directory is reused when finished
    and `--reuse`."""
    run_dir = out / name
    entrypoint, overrides = row
    prefix = "sft" if entrypoint == "sft.py" else "rl"
    command = [sys.executable, entrypoint, *overrides, f"{prefix}.pretrained_model={args.start}"]
    command += [f"hydra.run.dir={run_dir}", *(args.rl_overrides if prefix == "rl" else [])]
    if args.reuse and (run_dir / "hf_model" / "config.json").is_file():
        print(f"reusing {run_dir}", flush=True)
        return {"command": shlex.join(command), "wall_s": None, "reused": True}
    return {"command": shlex.join(command), "wall_s": run(command, out / f"train_{name}.log", args.threads)}


def evaluate(name: str, model: Path, out: Path, args: argparse.Namespace) -> dict:
    """evaluate.py --mode accuracy on the first `--prompts` test questions; its summary and command."""
    result = out / f"eval_{name}.json"
    command = [sys.executable, "evaluate.py", "--mode", "accuracy", "--model_path", str(model)]
    command += ["--dataset", "demo/arithmetic", "--split", "test", "--limit", str(args.prompts)]
    command += ["--steps", str(args.steps), "--seed", str(args.seed), "--batch_size", "50"]
    command += ["--num_samples", str(args.num_samples)]
    command += ["--output", str(result), "--guidance_candidates", str(args.candidates), *ROWS[name][1]]
    wall = run(command, out / f"eval_{name}.log", args.threads)
    summary = json.loads(result.read_text(encoding="utf-8"))["accuracy"]["summary"]
    return {"command": shlex.join(command), "wall_s": wall, "summary": summary}


def table(results: dict[str, dict]) -> str:
    """The results as a Markdown table (accuracy = mean over the prompts of one answer's correctness)."""
    lines = [
        "| model / sampling | accuracy | vs start (SE) | vs control (SE) | answered | well-formed `#### N` "
        "| answer follows its work | follows work vs control (SE) | guiding reward | train s | eval s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        s = r["eval"]["summary"]
        reward = s.get("guidance_reward")
        train_s = r.get("train", {}).get("wall_s")
        reward_cell = "" if reward is None else f"{reward:.3f}"
        train_cell = "" if train_s is None else f"{train_s:.0f}"
        versus = [
            "" if r.get(key) is None else f"{r[key]['difference']:+.3f} ({r[key]['se']:.3f})"
            for key in ("vs_start", "vs_control", "follows_vs_control")
        ]
        lines.append(
            f"| {ROWS[name][0]} | {s['sample_accuracy']:.3f} | {versus[0]} | {versus[1]} | {s['answered']:.3f} | "
            f"{r['format_rate']:.3f} | {r['follows_work_rate']:.3f} | {versus[2]} | {reward_cell} | {train_cell} | "
            f"{r['eval']['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def eval_examples(eval_json: Path) -> list[dict]:
    """The per-question examples of an evaluate.py --mode accuracy result file."""
    return json.loads(eval_json.read_text(encoding="utf-8"))["accuracy"]["examples"]


def question_accuracies(examples: list[dict]) -> list[float]:
    """Each question's share of right answers."""
    return [sum(map(bool, e["correct"])) / len(e["correct"]) for e in examples]


def question_follows_work(examples: list[dict]) -> list[float]:
    """Each question's share of answers whose `#### N` follows their own work (`answer_follows_work`)."""
    return [sum(map(answer_follows_work, e["completions"])) / len(e["completions"]) for e in examples]


def paired_difference(rows: list[float], reference: list[float], draws: int = 2000, seed: int = 0) -> dict:
    """The mean of per-question values `rows` minus `reference` (accuracies, follows-work rates), paired by question
    (the same prompts and seed), with its bootstrap standard error over questions: a question's answers and both
    rows' answers to it move together, so this is the noise a gap in the table must clear."""
    if len(rows) != len(reference):
        raise ValueError(f"rows answer {len(rows)} questions, the reference {len(reference)}")
    differences = [a - b for a, b in zip(rows, reference, strict=True)]
    n = len(differences)
    rng = random.Random(seed)
    means = [sum(differences[rng.randrange(n)] for _ in range(n)) / n for _ in range(draws)]
    centre = sum(means) / draws
    se = (sum((m - centre) ** 2 for m in means) / (draws - 1)) ** 0.5
    return {"difference": sum(differences) / n, "se": se}


def completions_of(examples: list[dict]) -> list[str]:
    """Every answer of every question."""
    return [c for e in examples for c in e["completions"]]


def format_rate(completions: list[str]) -> float:
    """The share of answers that end with a well-formed `#### N` line (the format reward)."""
    return sum(format_reward([""] * len(completions), completions, pattern=FORMAT_PATTERN)) / len(completions)


def follows_work_rate(completions: list[str]) -> float:
    """The share of answers whose `#### N` is the result of their own last worked equation, true or not: a
    joint property of tokens the sampler unmasks in parallel, which the reward asks for and SFT does not teach."""
    return sum(map(answer_follows_work, completions)) / len(completions)


def answer_statistics(name: str, out: Path, results: dict[str, dict]) -> dict:
    """What the table reads from row `name`'s answers (`out`/eval_<name>.json) beyond evaluate.py's summary: the
    format and follows-work rates, and its accuracy and follows-work rate against the start's and the control's
    rows when measured (paired by question: `vs_start`, `vs_control`, `follows_vs_start`, `follows_vs_control`)."""
    examples = eval_examples(out / f"eval_{name}.json")
    completions = completions_of(examples)
    stats = {"format_rate": format_rate(completions), "follows_work_rate": follows_work_rate(completions)}
    for key, other in (("vs_start", "sft"), ("vs_control", "sft_continued")):
        if other in results and name not in (other, "sft"):
            other_examples = eval_examples(out / f"eval_{other}.json")
            for prefix, per_question in (("", question_accuracies), ("follows_", question_follows_work)):
                stats[prefix + key] = paired_difference(per_question(examples), per_question(other_examples))
    return stats


def rescore(results_json: Path) -> int:
    """Recompute the answer statistics of a finished benchmark's rows from the eval files in its `out` directory
    (no training, no evaluation), write them back to `results_json` and print the table."""
    stored = json.loads(results_json.read_text(encoding="utf-8"))
    out = ROOT / stored["settings"]["out"]
    results = stored["results"]
    missing = [name for name in results if not (out / f"eval_{name}.json").is_file()]
    if missing:
        raise SystemExit(
            f"--rescore needs the run's eval files, and {out} lacks eval_{missing[0]}.json ({len(missing)} missing); "
            "rerun the benchmark to make them."
        )
    for name in results:
        results[name].update(answer_statistics(name, out, results))
    results_json.write_text(json.dumps(stored, indent=2) + "\n", encoding="utf-8")
    print(f"{table(results)}\n\nrescored from {out}: {results_json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--task",
        choices=list(TASKS),
        default="clean",
        help="clean: the demo as generated; noisy: a start fine-tuned on answers 30%% off by one, RL against a "
        "verifier (configs/experiment/rl_demo_noisy.yaml)",
    )
    parser.add_argument(
        "--start", default=None, help="the SFT run (or hub-format) directory (default: the task's start)"
    )
    parser.add_argument(
        "--methods", nargs="+", choices=list(ROWS), default=list(ROWS), help="rows to measure"
    )
    parser.add_argument("--prompts", type=int, default=200, help="first N questions of the test split")
    parser.add_argument(
        "--num_samples", type=int, default=1, help="answers per question (accuracy: mean over all answers)"
    )
    parser.add_argument("--steps", type=int, default=24, help="sampler steps of the evaluation")
    parser.add_argument("--candidates", type=int, default=4, help="N of the guided rows")
    parser.add_argument("--seed", type=int, default=0, help="evaluation seed (the same for every row)")
    parser.add_argument("--out", default="exp_local/demo/rl_benchmark", help="run directories, logs, results")
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs (None: as set)"
    )
    parser.add_argument("--reuse", action="store_true", help="reuse finished trained runs in --out")
    parser.add_argument(
        "--rl_overrides", nargs="*", default=[], help="extra run_rl.py overrides (key=value) of the RL rows"
    )
    parser.add_argument(
        "--rescore",
        type=Path,
        default=None,
        metavar="RESULTS_JSON",
        help="only recompute the table's answer statistics of a finished run from its eval files and print it",
    )
    args = parser.parse_args(argv)
    if args.rescore is not None:
        return rescore(args.rescore)
    args.start = args.start or TASKS[args.task][2]
    if not (ROOT / args.start / "hf_model").is_dir() and not (ROOT / args.start / "config.json").is_file():
        parser.error(
            f"no model at {args.start}; run `python sft.py experiment=demo sft.dataset={TASKS[args.task][1]} "
            f"hydra.run.dir={args.start}`."
        )
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    trained = trained_rows(args.task)
    results: dict[str, dict] = {}
    for name in args.methods:
        entry: dict = {}
        model = ROOT / args.start
        if name in trained:
            entry["train"] = train(name, trained[name], out, args)
            model = out / name
        entry["eval"] = evaluate(name, model, out, args)
        results[name] = entry
        results[name].update(answer_statistics(name, out, results))
        (out / "results.json").write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))
    print(
        f"\n{table(results)}\n\n{args.prompts} test prompts x {args.num_samples} answers, {args.steps} steps, "
        f"seed {args.seed}: {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
