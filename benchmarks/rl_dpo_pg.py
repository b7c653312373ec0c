"""Diffusion DPO on an offline preference set (rl/method=dpo, rl.method.offline.dataset=...) on the offline CPU
demo, started from the SFT demo model: the policy's preference accuracy on held-out pairs. No network; about two
CPU minutes. (Held-out answer accuracy of policy gradient and online DPO is measured by benchmarks/rl_demo.py,
with the same protocol as the other methods; `benchmarks/results/rl_dpo_pg.json` keeps this script's earlier
pg / dpo_online rows.)

    HF_HUB_OFFLINE=1 python sft.py experiment=demo hydra.run.dir=exp_local/demo/sft      # the start (once)
    python benchmarks/rl_dpo_pg.py --threads 2

The run is the real command line (printed with its wall time). Reported from its train.log: preference pairs
built from the demo data (chosen: the reference answer; rejected: the same worked answer with the wrong
operation, `corrupt`), trained on the train split; the policy's preference accuracy (share of held-out
test-split pairs with a positive implicit reward margin) and its likelihood accuracy (share whose chosen answer
has the higher ELBO under the policy itself), start and end.
Results: a markdown table on stdout and benchmarks/results/rl_dpo_pg.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# every run: the rl_demo experiment (its EMA 0.9: what is evaluated and exported follows the few updates), no
# per-sample files
COMMON = ["experiment=rl_demo", "logging.samples=False"]
RUNS = {
    "dpo_offline": [
        "rl/method=dpo",
        "rl.method.offline.dataset={prefs}",
        "rl.method.offline.eval_split=test",
        "rl.method.offline.eval_pairs=200",
        "rl.eval_prompts=0",  # held-out pairs only: training reads no samples
        "optim.lr=5e-4",
        "training.n_iters=20",
        "training.eval_freq=10",
    ],
}


OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
WRONG_OPERATION = {"+": "-", "-": "+", "*": "+"}


def corrupt(answer: str) -> str:
    """The worked answer with the wrong operation in every line (`+` and `-` swapped, `*` made `+`), its
    results recomputed so that the rejected answer is consistent arithmetic for the wrong question."""
    lines, carried = [], None
    for line in answer.split("\n")[:-1]:
        left, op, right = re.fullmatch(r"(-?\d+) ([-+*]) (-?\d+) = -?\d+", line).groups()
        a = carried if carried is not None else int(left)
        wrong = WRONG_OPERATION[op]
        carried = OPERATIONS[wrong](a, int(right))
        lines.append(f"{a} {wrong} {right} = {carried}")
    return "\n".join([*lines, f"#### {carried}"])


def write_preferences(directory: Path) -> Path:
    """train.jsonl / test.jsonl of (prompt, chosen, rejected) rows from the demo arithmetic splits."""
    from data import make_demo_arithmetic

    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in make_demo_arithmetic().items():
        with open(directory / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                pair = {
                    "prompt": row["question"],
                    "chosen": row["answer"],
                    "rejected": corrupt(row["answer"]),
                }
                f.write(json.dumps(pair) + "\n")
    return directory


def eval_lines(log: str) -> dict[int, dict[str, float]]:
    """{step: metrics} of the `step N eval: k=v, ...` lines of a train.log."""
    out: dict[int, dict[str, float]] = {}
    for step, body in re.findall(r"step (\d+) eval: (.*)", log):
        out[int(step)] = {k: float(v) for k, v in re.findall(r"(\w+)=([-\d.e+]+|nan)", body)}
    return out


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(name: str, overrides: list[str], out_dir: Path, threads: int) -> dict:
    command = [sys.executable, "run_rl.py", *COMMON, *overrides, f"hydra.run.dir={out_dir / name}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    print("$", " ".join(command[1:]), flush=True)
    start, cpu_start = time.perf_counter(), child_cpu_seconds()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, child_cpu_seconds() - cpu_start
    if result.returncode != 0:
        raise SystemExit(f"{name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    evals = eval_lines((out_dir / name / "train.log").read_text())
    first, last = evals[min(evals)], evals[max(evals)]
    row = {
        "command": "python " + " ".join(command[1:]),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),  # user + system CPU time of the run: what a busy machine does not inflate
        "updates": max(evals),
    }
    if "heldout_pref_accuracy" in first:
        for key in ("heldout_pref_accuracy", "heldout_likelihood_accuracy", "heldout_reward_margin"):
            row[f"{key}_start"], row[f"{key}_end"] = first[key], last[key]
    print(f"  {wall:.0f} s: {json.dumps({k: v for k, v in row.items() if k != 'command'})}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=list(RUNS), help="which runs")
    parser.add_argument("--start", default="exp_local/demo/sft", help="the SFT model every run starts from")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides of every run")
    parser.add_argument("--out_dir", default="exp_local/bench/rl_dpo_pg", help="run directories (replaced)")
    parser.add_argument("--results", default="benchmarks/results/rl_dpo_pg.json", help="JSON results file")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="OMP_NUM_THREADS of each run"
    )
    args = parser.parse_args()
    if not (REPO / args.start).exists():
        raise SystemExit(
            f"No model at {args.start}: run `HF_HUB_OFFLINE=1 python sft.py experiment=demo "
            "hydra.run.dir=exp_local/demo/sft` (the SFT demo model)."
        )
    out_dir = REPO / args.out_dir
    prefs = write_preferences(out_dir / "preferences")
    results = {}
    for name in args.runs:
        shutil.rmtree(out_dir / name, ignore_errors=True)
        overrides = [
            f"rl.pretrained_model={args.start}",
            *(o.format(prefs=prefs) for o in RUNS[name]),
            *args.overrides,
        ]
        results[name] = run(name, overrides, out_dir, args.threads)
    path = REPO / args.results
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**previous, **results}, indent=2) + "\n")
    print("\n| run | wall (s) | CPU (s) | updates | held-out preference accuracy |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        pref = (
            f"{r['heldout_pref_accuracy_start']:.2f} -> {r['heldout_pref_accuracy_end']:.2f}"
            if "heldout_pref_accuracy_start" in r
            else ""
        )
        print(f"| {name} | {r['wall_s']} | {r['cpu_s']} | {r['updates']} | {pref} |")


if __name__ == "__main__":
    main()
