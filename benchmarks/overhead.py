"""Framework and communication overhead: 2 ranks x 1 thread (FSDP) against 1 rank x 2 threads.

    python -m benchmarks.overhead [--model small] [--seq-len 256] [--global-batch 16] [--micro-batch 8]
                                  [--steps 20] [--warmup 5] [--rounds 3] [--log-interval 1]
                                  [--max-load 2.5] [--load-wait 300]

Both contenders run ``recipes.pretrain`` on the same model, global batch and micro-batch size and use
the same two cores:

A) ``fsdp2x1``: ``torchrun --nproc-per-node 2``, ``training.num_threads=1``: FSDP over 2 ranks, each
   computing half of the global batch on one thread, plus all-gathers and reduce-scatters over gloo.
B) ``single1x2``: one process, ``training.num_threads=2``: the whole batch, intra-op parallel.

They alternate (A, B, A, B, ...), each in a fresh process. A run's number is the median of the
``tokens_per_s`` its ``metrics.jsonl`` reports (``logging.log_interval``, default every step) after
``--warmup`` steps; the ratio A / B is the median over rounds of each round's ratio. Below 1 the
2-rank run pays more in framework and communication overhead than it gains from running two
independent ranks. Note that with ``log_interval=1`` every step of A runs under the trainer's
communication counter (a TorchDispatchMode); ``--log-interval 5`` shows how much that costs.

Before each run the benchmark waits (up to ``--load-wait`` s) for the 1-minute load average to drop
under ``--max-load`` and prints the load each run started under, and the cores other processes kept
busy while it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONTENDERS = ("fsdp2x1", "single1x2")


def load_average() -> float:
    return os.getloadavg()[0]


def busy_cpu_seconds() -> float:
    """CPU seconds every process on the machine has used since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_children_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_load(max_load: float, max_wait: float) -> tuple[float, float]:
    """Sleep until the 1-minute load average is below `max_load` or `max_wait` s passed; (waited, load)."""
    began = time.perf_counter()
    while load_average() >= max_load and time.perf_counter() - began < max_wait:
        time.sleep(5)
    return time.perf_counter() - began, load_average()


def command(name: str, args: argparse.Namespace, run_dir: Path) -> list[str]:
    recipe = [f"model={args.model}", f"training.steps={args.steps}", f"training.seq_len={args.seq_len}",
              f"training.global_batch_size={args.global_batch}", f"training.micro_batch_size={args.micro_batch}",
              f"logging.log_interval={args.log_interval}", "eval.interval=0", "checkpoint.enabled=false",
              "logging.progress_bar=false", f"run.dir={run_dir}"]
    if name == "fsdp2x1":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                "-m", "recipes.pretrain", *recipe, "training.num_threads=1"]
    return [sys.executable, "-m", "recipes.pretrain", *recipe, "training.num_threads=2"]


def run(name: str, args: argparse.Namespace, tmp: Path) -> tuple[list[float], float]:
    """One fresh run: per-logged-step tokens/s after warmup, and the cores others kept busy meanwhile."""
    run_dir = tmp / f"{name}-{time.monotonic_ns()}"
    threads = "1" if name == "fsdp2x1" else "2"
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "WANDB_MODE": "disabled"}
    busy0, mine0, wall0 = busy_cpu_seconds(), own_children_cpu_seconds(), time.perf_counter()
    cmd = command(name, args, run_dir)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - wall0
    others = ((busy_cpu_seconds() - busy0) - (own_children_cpu_seconds() - mine0)) / wall
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{' '.join(cmd)}\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["tokens_per_s"] for r in rows if r["step"] > args.warmup], max(0.0, others)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=8, help="same for both (2 ranks: 1 micro-batch each)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="leading steps left out of the median")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--log-interval", type=int, default=1)
    parser.add_argument("--max-load", type=float, default=2.5, help="start a run only under this 1-min load")
    parser.add_argument("--load-wait", type=float, default=300.0, help="longest wait for the load to drop, s")
    args = parser.parse_args(argv)
    if args.global_batch % (2 * args.micro_batch):
        parser.error("--global-batch must be a multiple of 2 x --micro-batch")
    if args.steps <= args.warmup + args.log_interval:
        parser.error("--steps must leave logged steps after --warmup")

    print(f"overhead: model={args.model} seq_len={args.seq_len} global_batch={args.global_batch} "
          f"micro_batch={args.micro_batch} steps={args.steps} (warmup {args.warmup}) rounds={args.rounds} "
          f"log_interval={args.log_interval} | {os.cpu_count()} CPUs", flush=True)
    print(f"{'round':>5s} {'contender':10s} {'tok/s median':>12s} {'min':>8s} {'max':>8s} {'load@start':>10s} "
          f"{'others busy':>11s} {'waited s':>8s}", flush=True)
    medians: dict[str, list[float]] = {c: [] for c in CONTENDERS}
    loads: list[float] = []
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="titan-overhead-") as tmp:
        for round_index in range(1, args.rounds + 1):
            for name in CONTENDERS:
                waited, load = wait_for_load(args.max_load, args.load_wait)
                loads.append(load)
                rates, others = run(name, args, Path(tmp))
                medians[name].append(statistics.median(rates))
                print(f"{round_index:5d} {name:10s} {medians[name][-1]:12,.0f} {min(rates):8,.0f} {max(rates):8,.0f} "
                      f"{load:10.2f} {others:7.2f} cores {waited:8.0f}", flush=True)
    per_round = [a / b for a, b in zip(medians["fsdp2x1"], medians["single1x2"])]
    print(f"\nmedian tokens/s over rounds: fsdp2x1 {statistics.median(medians['fsdp2x1']):,.0f}, "
          f"single1x2 {statistics.median(medians['single1x2']):,.0f}")
    print(f"fsdp2x1 / single1x2: {statistics.median(per_round):.3f}  (per round "
          f"{', '.join(f'{r:.3f}' for r in per_round)}); no fixed goal")
    print(f"1-min load average at run starts: {min(loads):.2f} .. {max(loads):.2f} (threshold {args.max_load})")
    print(f"total wall time {time.perf_counter() - began:.0f}s")


if __name__ == "__main__":
    main()
