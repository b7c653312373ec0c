"""Measured gains of RL on the offline demo: held-out accuracy of the SFT start, after ReFT, after reward-weighted
denoising (RWD), and with reward-guided sampling (SVDD, best-of-N) of the start, on the same test prompts with
the same seed and sampler steps.

    python sft.py experiment=demo hydra.run.dir=exp_local/demo/sft     # the start (`make demo`)
    python benchmarks/rl_demo.py --threads 1                            # everything (72 min on 2 shared cores)
    python benchmarks/rl_demo.py --methods sft svdd --prompts 50        # a part of it

Every number comes from the real entrypoints, whose exact commands the script prints and records: `run_rl.py
experiment=rl_demo rl/method=reft|rwd` (the configs/experiment/rl_demo.yaml defaults) trains, `evaluate.py
--mode accuracy` measures the exported model on the first `--prompts` questions of demo/arithmetic's test split
(never trained on), one answer each (`sample_accuracy`). Guided rows steer the start's sampler with a reward:
`exact_match` sees the reference answer (an oracle verifier: an upper bound, not the model's own accuracy),
`consistent_arithmetic` checks that the worked equations are true and end in the `#### N` answer (no
reference: a verifier, not an oracle), `format` only checks for a well-formed `#### N` line. The table and every command, wall time and result go to
`--output` (JSON).
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

from rl.rewards import format_reward  # noqa: E402

FORMAT_PATTERN = r"####\s*-?\d+\s*$"

# name -> (what it is, evaluate.py flags beyond the common ones); "model" is the start or a trained run
ROWS = {
    "sft": ("SFT start", []),
    "reft": ("ReFT (run_rl.py rl/method=reft)", []),
    "rwd": ("reward-weighted denoising (rl/method=rwd)", []),
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
TRAINED = ("reft", "rwd")


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


def train(method: str, out: Path, args: argparse.Namespace) -> dict:
    """ReFT or RWD from the start with the rl_demo experiment; the run directory is reused when finished."""
    run_dir = out / method
    command = [sys.executable, "run_rl.py", "experiment=rl_demo", f"rl/method={method}"]
    command += [f"rl.pretrained_model={args.start}", f"hydra.run.dir={run_dir}", *args.rl_overrides]
    if args.reuse and (run_dir / "hf_model" / "config.json").is_file():
        print(f"reusing {run_dir}", flush=True)
        return {"command": shlex.join(command), "wall_s": None, "reused": True}
    return {"command": shlex.join(command), "wall_s": run(command, out / f"train_{method}.log", args.threads)}


def evaluate(name: str, model: Path, out: Path, args: argparse.Namespace) -> dict:
    """evaluate.py --mode accuracy on the first `--prompts` test questions; its summary and command."""
    result = out / f"eval_{name}.json"
    command = [sys.executable, "evaluate.py", "--mode", "accuracy", "--model_path", str(model)]
    command += ["--dataset", "demo/arithmetic", "--split", "test", "--limit", str(args.prompts)]
    command += ["--steps", str(args.steps), "--seed", str(args.seed), "--batch_size", "50"]
    command += ["--output", str(result), "--guidance_candidates", str(args.candidates), *ROWS[name][1]]
    wall = run(command, out / f"eval_{name}.log", args.threads)
    summary = json.loads(result.read_text(encoding="utf-8"))["accuracy"]["summary"]
    return {"command": shlex.join(command), "wall_s": wall, "summary": summary}


def table(results: dict[str, dict]) -> str:
    """The results as a Markdown table (accuracy = mean over the prompts of one answer's correctness)."""
    lines = [
        "| model / sampling | accuracy | answered | well-formed `#### N` | guiding reward | train s | eval s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        s = r["eval"]["summary"]
        reward = s.get("guidance_reward")
        train_s = r.get("train", {}).get("wall_s")
        lines.append(
            f"| {ROWS[name][0]} | {s['sample_accuracy']:.3f} | {s['answered']:.3f} | {r['format_rate']:.3f} | "
            f"{'' if reward is None else f'{reward:.3f}'} | {'' if train_s is None else f'{train_s:.0f}'} | "
            f"{r['eval']['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def format_rate(eval_json: Path) -> float:
    """The share of answers that end with a well-formed `#### N` line (the format reward)."""
    examples = json.loads(eval_json.read_text(encoding="utf-8"))["accuracy"]["examples"]
    completions = [c for e in examples for c in e["completions"]]
    return sum(format_reward([""] * len(completions), completions, pattern=FORMAT_PATTERN)) / len(completions)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--start", default="exp_local/demo/sft", help="the SFT run (or hub-format) directory")
    parser.add_argument(
        "--methods", nargs="+", choices=list(ROWS), default=list(ROWS), help="rows to measure"
    )
    parser.add_argument("--prompts", type=int, default=200, help="first N questions of the test split")
    parser.add_argument("--steps", type=int, default=24, help="sampler steps (rl_demo's sampling.steps)")
    parser.add_argument("--candidates", type=int, default=4, help="N of the guided rows")
    parser.add_argument("--seed", type=int, default=0, help="evaluation seed (the same for every row)")
    parser.add_argument("--out", default="exp_local/demo/rl_benchmark", help="run directories, logs, results")
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs (None: as set)"
    )
    parser.add_argument("--reuse", action="store_true", help="reuse finished ReFT/RWD runs in --out")
    parser.add_argument("--rl_overrides", nargs="*", default=[], help="extra run_rl.py overrides (key=value)")
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
        entry["format_rate"] = format_rate(out / f"eval_{name}.json")
        results[name] = entry
        (out / "results.json").write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))
    print(f"\n{table(results)}\n\n{args.prompts} test prompts, {args.steps} steps, seed {args.seed}: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
