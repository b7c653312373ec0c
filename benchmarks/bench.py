"""Speed and memory of a SEDD training step and sampler: this project against the original code path.

    python benchmarks/bench.py --model small --batch 4 --length 128 --device cpu --precision fp32 bf16

Every measurement runs in a fresh subprocess (so peak memory is its own), times `--steps` training steps
(or `--sample-repeats` full sampling runs) after `--warmup` untimed ones and reports the median. See
benchmarks/README.md for what is measured and how to read the table.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------- memory
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        return int(re.search(rf"^{field}:\s+(\d+)", status.read(), re.M).group(1))


class PeakMemory:
    """Peak memory of the timed region: `torch.cuda.max_memory_allocated` on CUDA; on CPU the process's
    resident-set high-water mark (VmHWM), reset after warm-up through /proc/self/clear_refs. `baseline` is the
    memory held just before the timed region (weights, optimizer state, EMA), after freed heap is trimmed."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        self.baseline = _proc_status_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated()
        return _proc_status_kib("VmHWM") * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------- models
def run_config(model: str) -> dict:
    """The SEDD run config of configs/model/<model>.yaml on the GPT-2 vocabulary, absorbing graph."""
    arch = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "model" / f"{model}.yaml"))
    return {"tokens": 50257, "graph": {"type": "absorb"}, "noise": {"type": "loglinear"}, "model": arch}


def random_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict of `model.SEDD(config)` with its zero-initialised layers (adaLN, output) made random."""
    from model import SEDD

    torch.manual_seed(seed)
    weights = SEDD(config).state_dict()
    for tensor in weights.values():
        if tensor.is_floating_point() and not tensor.any():
            tensor.normal_(0.0, 0.02)
    return weights


def flops_per_token(config: dict, length: int) -> float:
    """Matmul FLOPs of one forward pass per token, counting what the original does: every block's
    projections (24 d^2), bidirectional attention (4 L d per block) and the full-vocabulary output (2 d V)."""
    arch = config["model"]
    d, vocab = arch["hidden_size"], config["tokens"] + 1
    return arch["n_blocks"] * (24 * d * d + 4 * length * d) + 2 * d * vocab


# ----------------------------------------------------------------------------------------------- workers
def _ours_model(config, weights, args, device):
    """This project's SEDD with `weights` on `device`; `--no-pad-output` turns the CUDA output-row padding off."""
    from model import SEDD

    model = SEDD(config)
    model.load_weights(weights)
    if args.no_pad_output:
        model.output_layer.cuda_row_multiple = 1
    return model.to(device)


def _ours_train(config, weights, args, device, dtype):
    """A step of training.train_step (the code path of sft.py / train.py) with stratified t."""
    import graph_lib
    import noise_lib
    import training
    from model.ema import ExponentialMovingAverage

    model = _ours_model(config, weights, args, device).train()
    forward_model = training.prepare_model(
        model,
        activation_checkpointing=args.checkpointing,
        compile=args.compile or args.compile_mode is not None,
        compile_mode=args.compile_mode,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = training.build_optimizer(params, lr=3e-4)
    state = training.TrainState(
        model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, training.lr_lambda(2500, 10**6)),
        ema=ExponentialMovingAverage(params, decay=0.9999),
    )
    graph, noise = graph_lib.get_graph(config), noise_lib.get_noise(config)
    precision = "fp32" if dtype is None else "bf16"
    loss_kernel = "one_buffer" if args.no_fused_loss else None
    gen = torch.Generator().manual_seed(0)
    batch_size, length = args.batch, args.length

    def step() -> float:
        if args.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the CUDA graphs' outputs of the last step are dead
        x0 = torch.randint(0, config["tokens"], (batch_size, length), generator=gen)
        batch = (
            sft_batch(x0, gen)
            if args.sft_batches
            else {
                "input_ids": x0,
                "attention_mask": torch.ones_like(x0),
                "loss_mask": torch.ones_like(x0),
            }
        )
        draws = training.NoiseDraws(
            (torch.arange(batch_size) + 0.5) / batch_size,  # stratified t: half the tokens masked on average
            torch.rand(batch_size, length, generator=gen),
            torch.rand(batch_size, length, generator=gen),
        )
        batch = training.to_device(batch, device)
        draws = training.NoiseDraws(*(u.to(device) for u in (draws.u_t, draws.u_move, draws.u_token)))
        result = training.train_step(
            state,
            forward_model,
            [batch],
            lambda fwd, mb: training.batch_loss(fwd, mb, graph, noise, draws, loss_kernel=loss_kernel),
            precision=precision,
            device=device,
            grad_clip=1.0,
        )
        return result.loss

    return step


def sft_batch(x0: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """An SFT-like batch of x0 [B, L]: each row's length uniform in [L/2, L] (the rest padding), its first
    quarter a prompt (conditioning only). As in SFT the packed token count and the longest row change from
    batch to batch (what torch.compile must handle without recompiling at every step)."""
    batch_size, length = x0.shape
    lengths = torch.randint(length // 2, length + 1, (batch_size,), generator=gen)
    positions = torch.arange(length)[None, :]
    attention_mask = (positions < lengths[:, None]).long()
    loss_mask = attention_mask * (positions >= (lengths // 4)[:, None])
    return {"input_ids": x0, "attention_mask": attention_mask, "loss_mask": loss_mask}


def _original_train(config, weights, args, device, dtype):
    from original_sedd import OriginalSEDD, OriginalTrainer

    model = OriginalSEDD(config)
    model.load_state_dict(weights, strict=False)
    model.to(device).train()
    trainer = OriginalTrainer(model)
    gen = torch.Generator().manual_seed(0)
    t = ((torch.arange(args.batch) + 0.5) / args.batch * (1 - 1e-3) + 1e-3).to(device)

    def step() -> float:
        x0 = torch.randint(0, config["tokens"], (args.batch, args.length), generator=gen).to(device)
        return float(trainer.train_step(x0, t, dtype))

    return step


def _ours_sample(config, weights, args, device, dtype):
    import graph_lib
    import noise_lib
    import sampling

    model = _ours_model(config, weights, args, device).eval()
    if args.compile_mode not in (None, "default"):
        raise SystemExit(
            "--compile-mode applies to training only; the sampler takes --compile (default mode)"
        )
    if args.compile:
        model.compile_blocks()  # in place, as run_sample.py --compile does
    graph, noise = graph_lib.get_graph(config), noise_lib.get_noise(config)

    def run(steps: int) -> torch.Tensor:
        return sampling.sample(
            model, graph, noise, batch_size=args.batch, length=args.length, steps=steps, autocast_dtype=dtype
        )

    return run


def _original_sample(config, weights, args, device, dtype):
    from original_sedd import OriginalSEDD, original_sample

    model = OriginalSEDD(config)
    model.load_state_dict(weights, strict=False)
    model.to(device).eval()
    return lambda steps: original_sample(model, args.batch, args.length, steps, dtype=dtype)


WORKERS = {
    ("ours", "train"): _ours_train,
    ("original", "train"): _original_train,
    ("ours", "sample"): _ours_sample,
    ("original", "sample"): _original_sample,
}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return usage.ru_utime + usage.ru_stime


def _timed(run: Callable[[], Any], repeats: int, device: torch.device) -> tuple[list[float], float, Any]:
    """Wall seconds of each of `repeats` calls, the process CPU seconds (user + system) per call, last result."""
    times, result, cpu_start = [], None, _cpu_seconds()
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times, (_cpu_seconds() - cpu_start) / repeats, result


def measure(job: dict) -> dict:
    """Run one (impl, task, model, device, precision) measurement in this process."""
    args = argparse.Namespace(**job)
    device, dtype = torch.device(args.device), DTYPES[args.precision]
    config = run_config(args.model)
    config["model"]["length"] = max(config["model"]["length"], args.length)
    work = WORKERS[args.impl, args.task](config, random_weights(config), args, device, dtype)
    memory = PeakMemory(device)
    tokens = args.batch * args.length
    if args.task == "train":
        _timed(work, args.warmup, device)
        memory.start()
        times, cpu, loss = _timed(work, args.steps, device)
        if args.sft_batches:  # real tokens only: E[length] = 3/4 L
            tokens = 0.75 * tokens
        flops, extra = 3 * flops_per_token(config, args.length) * tokens, {"loss": loss}
    else:
        work(2)  # warm-up: kernels, allocator, thread pool
        memory.start()
        times, cpu, _ = _timed(lambda: work(args.sample_steps), args.sample_repeats, device)
        flops = (args.sample_steps + 1) * flops_per_token(config, args.length) * tokens
        extra = {"sample_steps": args.sample_steps}
    seconds = statistics.median(times)
    if args.profile:
        write_profile(work if args.task == "train" else lambda: work(args.sample_steps), job, device)
    return {
        **job,
        **extra,
        "seconds": seconds,
        "times": times,
        "cpu_seconds": cpu,
        "tokens_per_s": tokens / seconds,
        "gflops": flops / seconds / 1e9,
        "peak_bytes": memory.peak(),
        "baseline_bytes": memory.baseline,
    }


def write_profile(run: Callable[[], Any], job: dict, device: torch.device) -> None:
    """Profile two more calls of `run` and write the 40 ops with the most self time (device time on CUDA) to
    `<profile dir>/profile_<impl>_<task>_<model>_<device>_<precision>.txt`, and their timeline (kernels and
    host calls, for chrome://tracing or Perfetto) to `trace_<same>.json`."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        _timed(run, 2, device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    name = "_".join(str(job[k]) for k in ("impl", "task", "model", "device", "precision"))
    path = Path(job["profile"]) / f"profile_{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=60))
    prof.export_chrome_trace(str(path.with_name(f"trace_{name}.json")))


def matmul_peak(job: dict) -> dict:
    """GFLOP/s of a square matmul (n = 4096 on CUDA, 2048 on CPU) in fp32 and bf16, median of 5 after warm-up."""
    device = torch.device(job["device"])
    n = 4096 if device.type == "cuda" else 2048
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        for _ in range(3):
            torch.mm(a, b)
        times = []
        for _ in range(5):
            _sync(device)
            start = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            times.append(time.perf_counter() - start)
        out[name] = 2 * n**3 / statistics.median(times) / 1e9
    return {"kind": "peak", "device": job["device"], **out}


# ----------------------------------------------------------------------------------------------- driver
def run_job(job: dict) -> dict:
    """Run `job` in a fresh interpreter and return its JSON result."""
    env = dict(os.environ)
    if job.get("thp"):
        env["THP_MEM_ALLOC_ENABLE"] = "1"  # read by torch's CPU allocator at start-up
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker failed for {job}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt_mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def table(results: list[dict], peaks: dict[str, dict]) -> str:
    """One row per measurement. `x orig` is the speedup against the original at the same precision (wall time;
    in brackets against the original in fp32); `x cpu` is the same ratio in process CPU time (user + system)."""
    by_key = {(r["model"], r["device"], r["task"], r["precision"], r["impl"]): r for r in results}
    head = (
        f"{'model':6} {'device':6} {'task':6} {'prec':5} {'impl':9} {'tokens/s':>9} {'s/iter':>8} "
        f"{'cpu s':>7} {'x orig':>14} {'x cpu':>6} {'peak MiB':>9} {'+step MiB':>9} {'GFLOP/s':>8} {'%peak':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        key = (r["model"], r["device"], r["task"])
        base = by_key.get((*key, r["precision"], "original"))
        base32 = by_key.get((*key, "fp32", "original"))
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        if base32 and base32 is not base:
            speed += f" ({r['tokens_per_s'] / base32['tokens_per_s']:.2f}x)"
        cpu_speed = f"{base['cpu_seconds'] / r['cpu_seconds']:.2f}x" if base else "-"
        peak = peaks[r["device"]][r["precision"]]
        lines.append(
            f"{r['model']:6} {r['device']:6} {r['task']:6} {r['precision']:5} {r['impl']:9} "
            f"{r['tokens_per_s']:9.1f} {r['seconds']:8.3f} {r['cpu_seconds']:7.2f} {speed:>14} {cpu_speed:>6} "
            f"{_fmt_mib(r['peak_bytes']):>9} {_fmt_mib(r['peak_bytes'] - r['baseline_bytes']):>9} "
            f"{r['gflops']:8.1f} {100 * r['gflops'] / peak:5.0f}%"
        )
    lines.append("")
    for device, peak in peaks.items():
        lines.append(
            f"matmul peak on {device}: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s "
            f"(start {peak['start_fp32']:.0f}/{peak['start_bf16']:.0f}, end {peak['end_fp32']:.0f}/"
            f"{peak['end_bf16']:.0f}); %peak uses the matching precision"
        )
    return "\n".join(lines)


# option -> (choices, help); each takes one or more values and defaults to all of its choices
LIST_OPTIONS = {
    "model": (
        ["tiny", "small"],
        "configs/model/<name>.yaml architectures (random weights, GPT-2 vocabulary)",
    ),
    "precision": (
        ["fp32", "bf16"],
        "fp32, or bf16 autocast (model matmuls in bf16; losses and states in fp32)",
    ),
    "impl": (["original", "ours"], "the straightforward original code path and/or this project"),
    "task": (["train", "sample"], "training step and/or analytic sampler"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, (choices, help_text) in LIST_OPTIONS.items():
        parser.add_argument(f"--{name}", nargs="+", default=choices, choices=choices, help=help_text)
    parser.add_argument("--batch", type=int, default=4, help="sequences per training step / sampling run")
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    parser.add_argument("--sample-steps", type=int, default=32, help="predictor steps per sampling run")
    parser.add_argument("--sample-repeats", type=int, default=3, help="timed sampling runs (median reported)")
    parser.add_argument(
        "--device", nargs="+", default=None, help="cpu and/or cuda (default: cpu, plus cuda when available)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads in every worker (default: torch's, all cores)",
    )
    parser.add_argument("--checkpointing", action="store_true", help="ours: activation checkpointing")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="ours: torch.compile the transformer blocks (training and sampler)",
    )
    parser.add_argument(
        "--compile-mode",
        default=None,
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="ours: compile the blocks (implies --compile) with this torch.compile mode",
    )
    parser.add_argument(
        "--sft-batches",
        action="store_true",
        help="ours: SFT-like padded training batches (lengths uniform in [L/2, L], a quarter prompt); "
        "tokens/s counts the expected real tokens",
    )
    parser.add_argument(
        "--no-pad-output",
        action="store_true",
        help="ours: compute the output layer on the vocabulary's 50258 rows as they are (on CUDA they are "
        "padded to a multiple of 64 for aligned GEMMs)",
    )
    parser.add_argument(
        "--no-fused-loss",
        action="store_true",
        help="ours: the eager one-buffer score-entropy kernel on CUDA too (default there: the compiled fused one)",
    )
    parser.add_argument(
        "--thp",
        action="store_true",
        help="run every worker (both implementations) with THP_MEM_ALLOC_ENABLE=1: torch backs large CPU "
        "tensors with transparent huge pages, so fresh per-step allocations cost far fewer page faults",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write all results to this JSON file")
    parser.add_argument(
        "--profile",
        default=None,
        help="also profile two steps of every measurement (torch.profiler) and write the top ops to this folder",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        job = json.loads(args.worker)
        if job.get("threads"):
            torch.set_num_threads(job["threads"])
        print(json.dumps(matmul_peak(job) if job.get("kind") == "peak" else measure(job)))
        return
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    names = (
        "batch length steps warmup sample_steps sample_repeats threads checkpointing compile compile_mode "
        "sft_batches no_pad_output no_fused_loss thp profile"
    ).split()
    common = {k: getattr(args, k) for k in names}
    load_start = os.getloadavg()
    peak_job = {"kind": "peak", "thp": args.thp, "threads": args.threads}
    peaks = {device: run_job({**peak_job, "device": device}) for device in devices}
    results = []
    for model, device, task, precision, impl in itertools.product(
        args.model, devices, args.task, args.precision, args.impl
    ):
        job = {**common, "model": model, "device": device, "task": task, "precision": precision, "impl": impl}
        results.append(run_job(job))
        times = [round(t, 3) for t in results[-1]["times"]]
        print(f"  {model} {device} {task} {precision} {impl}: times {times} s", file=sys.stderr, flush=True)
    for device in devices:
        start, end = peaks[device], run_job({**peak_job, "device": device})
        peaks[device] = {p: max(start[p], end[p]) for p in ("fp32", "bf16")}
        peaks[device].update(
            {f"{when}_{p}": run[p] for when, run in (("start", start), ("end", end)) for p in DTYPES}
        )
    print(table(results, peaks))
    load_end = os.getloadavg()
    print(f"load average (1, 5, 15 min): start {load_start}, end {load_end}")
    if args.json is not None:
        meta = {
            "argv": sys.argv,
            "torch": torch.__version__,
            "threads": args.threads or torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": load_end,
        }
        args.json.write_text(json.dumps({"meta": meta, "peaks": peaks, "results": results}, indent=1))


if __name__ == "__main__":
    main()
