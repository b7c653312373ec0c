"""Measured gains of RL on the offline demo: held-out accuracy of the SFT start, after each trained method (ReFT,
reward-weighted denoising, policy gradient, DPO on online pairs), after a continued-SFT control with the same
updates, and with reward-guided sampling (SVDD, best-of-N) of the start, on the same test prompts with the same
seed and sampler steps.

    python sft.py experiment=demo hydra.run.dir=exp_local/demo/sft     # the start (`make demo`)
    python benchmarks/rl_demo.py --threads 2                            # everything
    python benchmarks/rl_demo.py --methods sft sft_continued reft --num_samples 4   # a part of it

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


def continued_sft_overrides() -> list[str]:
    """The control row: the demo SFT recipe continued from the start with the RL rows' number of updates, batch
    size, learning rate (constant, no warmup) and EMA, read from configs/experiment/rl_demo.yaml. An RL gain
    counts only where it beats this: the same updates on the reference answers instead of the method's data."""
    rl_demo = OmegaConf.load(ROOT / "configs" / "experiment" / "rl_demo.yaml")
    n_iters = rl_demo.training.n_iters
    return [
        "experiment=demo",
        f"training.n_iters={n_iters}",
        f"training.batch_size={rl_demo.training.batch_size}",
        f"training.ema={rl_demo.training.ema}",
        f"optim.lr={rl_demo.optim.lr}",
        "optim.warmup=0",
        "optim.schedule=constant",
        f"training.eval_freq={n_iters}",
        f"training.snapshot_freq={n_iters}",
    ]


# trained rows: (entrypoint, overrides); the RL rows are `run_rl.py experiment=rl_demo` (its defaults are ReFT's)
TRAINED = {
    "sft_continued": ("sft.py", continued_sft_overrides()),
    "reft": ("run_rl.py", ["experiment=rl_demo", "rl/method=reft"]),
    "rwd": ("run_rl.py", ["experiment=rl_demo", "rl/method=rwd"]),
    "pg": ("run_rl.py", ["experiment=rl_demo", "rl/method=pg"]),
    "dpo_online": ("run_rl.py", ["experiment=rl_demo", "rl/method=dpo"]),
}


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


def train(name: str, out: Path, args: argparse.Namespace) -> dict:
    """A TRAINED row's run from the start; the run directory is reused when finished and `--reuse`."""
    run_dir = out / name
    entrypoint, overrides = TRAINED[name]
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
        "| model / sampling | accuracy | answered | well-formed `#### N` | answer follows its work | guiding reward "
        "| train s | eval s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        s = r["eval"]["summary"]
        reward = s.get("guidance_reward")
        train_s = r.get("train", {}).get("wall_s")
        reward_cell = "" if reward is None else f"{reward:.3f}"
        train_cell = "" if train_s is None else f"{train_s:.0f}"
        lines.append(
            f"| {ROWS[name][0]} | {s['sample_accuracy']:.3f} | {s['answered']:.3f} | {r['format_rate']:.3f} | "
            f"{r['follows_work_rate']:.3f} | {reward_cell} | {train_cell} | {r['eval']['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def completions_of(eval_json: Path) -> list[str]:
    """Every answer of an evaluate.py --mode accuracy result file."""
    examples = json.loads(eval_json.read_text(encoding="utf-8"))["accuracy"]["examples"]
    return [c for e in examples for c in e["completions"]]


def format_rate(completions: list[str]) -> float:
    """The share of answers that end with a well-formed `#### N` line (the format reward)."""
    return sum(format_reward([""] * len(completions), completions, pattern=FORMAT_PATTERN)) / len(completions)


def follows_work_rate(completions: list[str]) -> float:
    """The share of answers whose `#### N` is the result of their own last worked equation, true or not: a
    joint property of tokens the sampler unmasks in parallel, which the reward asks for and SFT does not teach."""
    return sum(map(answer_follows_work, completions)) / len(completions)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--start", default="exp_local/demo/sft", help="the SFT run (or hub-format) directory")
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
    args = parser.parse_args(argv)
    if not (ROOT / args.start / "hf_model").is_dir() and not (ROOT / args.start / "config.json").is_file():
        parser.error(
            f"no model at {args.start}; run `python sft.py experiment=demo hydra.run.dir={args.start}`."
        )
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    results: dict[str, dict] = {}
    for name in args.methods:
        entry: dict = {}
        model = ROOT / args.start
        if name in TRAINED:
            entry["train"] = train(name, out, args)
            model = out / name
        entry["eval"] = evaluate(name, model, out, args)
        completions = completions_of(out / f"eval_{name}.json")
        entry["format_rate"] = format_rate(completions)
        entry["follows_work_rate"] = follows_work_rate(completions)
        results[name] = entry
        (out / "results.json").write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))
    print(
        f"\n{table(results)}\n\n{args.prompts} test prompts x {args.num_samples} answers, {args.steps} steps, "
        f"seed {args.seed}: {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
