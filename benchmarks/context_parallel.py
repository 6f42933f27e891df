"""Context parallelism at a long sequence: activation memory, attention balance, bytes, step time,
and the cost of document masking, measured in one run.

    python -m benchmarks.context_parallel [--seq-len 4096] [--cps 1 2 4] [--balance-cps 2 4 8]
                                          [--steps 6] [--warmup 1] [--rounds 3] [--memory-goal 1.15]
                                          [--balance-goal 1.02] [--tolerance 0.05] [--busy-threshold 0.25]
                                          [--retries 1]

All on ``model=small`` (``model.max_seq_len`` raised to the sequence), fp32, gloo, micro batch 1.

(a) Activation memory per rank for each cp in ``--cps``: `benchmarks/context_parallel_worker.py`
    under ``torchrun --nproc-per-node cp`` builds the model through ``build_parallel_model`` and runs
    one micro-batch through the real runner and loss; activation memory is the bytes of the distinct
    storages autograd saves in that forward, parameters (sharded, unsharded, FSDP all-gather
    outputs) and buffers excluded (the worker's docstring says exactly what counts). Ratio: the
    largest rank's bytes over ``cp=1 bytes / cp``; goal <= ``--memory-goal``. The largest saved
    storages at cp=2, grouped by shape, show what dominates.
(b) Attention work balance: useful (causal) query-key pairs per rank, ``sum over its queries of
    (position + 1)``, from the chunk assignment of ``parallel.context_parallel.shard_sequence``
    against contiguous chunks (rank r holds the r-th 1/cp of the sequence); max / mean over ranks,
    exact; goal <= ``--balance-goal`` for the pairing.
(c) CP bytes per step: the worker's count (``parallel.comm_stats.CommCounter``, the trainer's
    counter) for each cp > 1, and ``comm_gb/cp`` in the cp2 runs' ``metrics.jsonl`` from (d),
    against the planner's bytes (FSDP over the cp ranks plus the all-gathered K/V).
(d) Step time: ``torchrun --nproc-per-node 2 -m recipes.pretrain parallel.cp=2`` with one thread
    per rank against one process with 2 threads, global batch 1; (e) document masking: the same one
    process with ``data.document_mask=true`` against plain causal. The three contenders alternate
    in rounds (fresh processes); a run's number is the median step time after ``--warmup`` steps,
    ratios are medians of the per-round ratios. A run during which other processes kept more than
    ``--busy-threshold`` cores busy is repeated (``--retries``); the table shows the cores they
    kept busy in the run used. No goal for (d) and (e).
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

import torch

from benchmarks.overhead import busy_cpu_seconds, own_children_cpu_seconds
from benchmarks.planner import plan_of
from parallel.context_parallel import shard_sequence

REPO = Path(__file__).resolve().parents[1]
MB = 1e6
CONTENDERS = {  # name -> (ranks, threads per rank, extra overrides)
    "cp2x1": (2, 1, ("parallel.cp=2",)),
    "single1x2": (1, 2, ()),
    "single1x2_docs": (1, 2, ("data.document_mask=true",)),
}


def base_overrides(args: argparse.Namespace) -> list[str]:
    """`model=small` at the sequence length, one sequence per step (global batch 1, micro batch 1)."""
    return ["model=small", f"model.max_seq_len={args.seq_len}", f"training.seq_len={args.seq_len}",
            "training.global_batch_size=1", "training.micro_batch_size=1", "eval.interval=0",
            "checkpoint.enabled=false", "logging.progress_bar=false"]


def torchrun(ranks: int, module: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m", module]


def run(cmd: list[str], threads: int, what: str) -> float:
    """Run `cmd` with `threads` OpenMP threads; the cores other processes kept busy meanwhile."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    busy0, mine0, wall0 = busy_cpu_seconds(), own_children_cpu_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - wall0
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return max(0.0, ((busy_cpu_seconds() - busy0) - (own_children_cpu_seconds() - mine0)) / wall)


# (a) and (c): the worker


def memory_run(args: argparse.Namespace, cp: int, tmp: Path) -> list[dict]:
    """One torchrun of the worker at this cp; its per-rank records."""
    out, threads = tmp / f"cp{cp}", max(1, (os.cpu_count() or 1) // cp)
    cmd = [*torchrun(cp, "benchmarks.context_parallel_worker"), "--out", str(out), *base_overrides(args),
           f"parallel.cp={cp}", f"training.num_threads={threads}"]
    run(cmd, threads, f"worker cp={cp}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(cp)]


def print_memory(records: dict[int, list[dict]], goal: float) -> bool:
    base = max(r["activation_bytes"] for r in records[1])
    print("\n(a) activation memory per rank (saved-tensor storages, params and buffers excluded), MB = 1e6 bytes")
    print(f"{'cp':>3s} {'max rank':>9s} {'min rank':>9s} {'cp=1 / cp':>9s} {'ratio':>6s} {'params+buffers':>14s}  goal")
    met = True
    for cp, recs in records.items():
        top = max(r["activation_bytes"] for r in recs)
        ratio = top / (base / cp)
        ok = cp == 1 or ratio <= goal
        met &= ok
        state = max(r["state_bytes"] for r in recs)
        print(f"{cp:3d} {top / MB:9.1f} {min(r['activation_bytes'] for r in recs) / MB:9.1f} {base / cp / MB:9.1f} "
              f"{ratio:6.3f} {state / MB:14.1f}  {'-' if cp == 1 else ('met' if ok else 'NOT met')}")
    return met


def print_breakdown(records: dict[int, list[dict]], cp: int, top: int = 12) -> None:
    """The largest groups of saved storages (same dtype and shape) on the fullest rank of `cp`."""
    rec = max(records[cp], key=lambda r: r["activation_bytes"])
    print(f"\n    largest saved storages at cp={cp}, rank {rec['rank']} ({rec['activation_bytes'] / MB:.1f} MB in "
          f"{rec['storages']} storages), grouped by dtype and the shape they were first saved with")
    print(f"    {'dtype shape':28s} {'count':>5s} {'MB':>7s}")
    for name, count, nbytes in rec["groups"][:top]:
        print(f"    {name:28s} {count:5d} {nbytes / MB:7.2f}")


# (b) attention balance


def useful_pairs(positions: torch.Tensor) -> int:
    """Query-key pairs a causal mask leaves for these query positions (keys 0..position)."""
    return int((positions + 1).sum())


def balance(seq_len: int, cp: int) -> tuple[float, float]:
    """max / mean of the useful pairs per rank: (our chunk pairing, contiguous chunks)."""
    positions = torch.arange(seq_len).unsqueeze(0)
    paired = [useful_pairs(shard_sequence(positions, r, cp)) for r in range(cp)]
    contiguous = [useful_pairs(chunk) for chunk in positions.chunk(cp, dim=1)]
    return tuple(max(p) / statistics.mean(p) for p in (paired, contiguous))


def print_balance(args: argparse.Namespace) -> bool:
    print(f"\n(b) attention work balance at seq {args.seq_len}: max / mean over cp ranks of useful causal "
          f"query-key pairs (exact)")
    print(f"{'cp':>3s} {'chunks i, 2cp-1-i':>17s} {'contiguous':>10s}  goal")
    met = True
    for cp in args.balance_cps:
        paired, contiguous = balance(args.seq_len, cp)
        met &= paired <= args.balance_goal
        print(f"{cp:3d} {paired:17.4f} {contiguous:10.4f}  {'met' if paired <= args.balance_goal else 'NOT met'}")
    return met


# (c) bytes


def cp_formula(args: argparse.Namespace, cp: int) -> float:
    """The planner's bytes on the cp group for one step of global batch 1 at this cp."""
    return plan_of([*base_overrides(args), f"parallel.cp={cp}"], cp).time.traffic_by_dim()["cp"]


def bytes_row(what: str, measured: float, formula: float, tolerance: float) -> bool:
    ratio = measured / formula
    ok = abs(ratio - 1) <= tolerance
    print(f"{what:34s} {measured / MB:12.4f} {formula / MB:11.4f} {ratio:7.4f}  {'met' if ok else 'NOT met'}")
    return ok


def print_bytes(args: argparse.Namespace, records: dict[int, list[dict]], cp2_rows: list[dict]) -> bool:
    print("\n(c) bytes per rank and step on the cp group (dp_shard = 1: FSDP's bytes are logged under cp too) "
          "vs the planner (titan.planner)")
    print(f"{'source':34s} {'measured MB':>12s} {'formula MB':>11s} {'ratio':>7s}  goal")
    met = True
    for cp in (cp for cp in records if cp > 1):
        measured = max(r["comm_bytes"].get("comm_gb/cp", 0.0) for r in records[cp])
        met &= bytes_row(f"worker, cp={cp}, one micro-batch", measured, cp_formula(args, cp), args.tolerance)
    if cp2_rows:
        measured = statistics.median(r["comm_gb/cp"] * 1e9 for r in cp2_rows)
        met &= bytes_row("recipe cp2 metrics.jsonl, median", measured, cp_formula(args, 2), args.tolerance)
    return met


# (d) and (e): step times


def recipe_run(name: str, args: argparse.Namespace, tmp: Path) -> tuple[list[dict], float]:
    """One fresh recipe run of a contender: its metrics rows, and the cores others kept busy."""
    ranks, threads, extra = CONTENDERS[name]
    run_dir = tmp / f"{name}-{time.monotonic_ns()}"
    entry = torchrun(ranks, "recipes.pretrain") if ranks > 1 else [sys.executable, "-m", "recipes.pretrain"]
    cmd = [*entry, *base_overrides(args), f"training.steps={args.steps}", f"training.num_threads={threads}",
           "logging.log_interval=1", f"run.dir={run_dir}", *extra]
    others = run(cmd, threads, name)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return rows, others


def step_times(rows: list[dict], warmup: int, tokens: int) -> list[float]:
    return [tokens / r["tokens_per_s"] for r in rows if r["step"] > warmup]


def time_contenders(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, list[float]], list[dict]]:
    """Alternating rounds; median step time per run and contender, and the cp2 runs' metrics rows."""
    print(f"\n(d), (e) step time at seq {args.seq_len}, global batch 1, {args.steps} steps (median after "
          f"{args.warmup}), {args.rounds} rounds")
    print(f"{'round':>5s} {'contender':15s} {'median s':>8s} {'min s':>6s} {'max s':>6s} {'others busy':>11s} "
          f"{'tries':>5s}")
    medians: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    cp2_rows: list[dict] = []
    for round_index in range(1, args.rounds + 1):
        for name in CONTENDERS:
            for tries in range(1, args.retries + 2):
                rows, others = recipe_run(name, args, tmp)
                if others <= args.busy_threshold:
                    break
            times = step_times(rows, args.warmup, args.seq_len)
            medians[name].append(statistics.median(times))
            if name == "cp2x1":
                cp2_rows += [r for r in rows if r["step"] > args.warmup]
            print(f"{round_index:5d} {name:15s} {medians[name][-1]:8.2f} {min(times):6.2f} {max(times):6.2f} "
                  f"{others:6.2f} cores {tries:5d}", flush=True)
    return medians, cp2_rows


def print_ratio(label: str, medians: dict[str, list[float]], a: str, b: str) -> None:
    per_round = [x / y for x, y in zip(medians[a], medians[b])]
    print(f"{label}: {a} / {b} step time {statistics.median(per_round):.3f} (rounds "
          f"{', '.join(f'{r:.3f}' for r in per_round)}); medians {statistics.median(medians[a]):.2f} s / "
          f"{statistics.median(medians[b]):.2f} s; no goal")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4], help="(a): cp degrees, 1 first")
    parser.add_argument("--balance-cps", type=int, nargs="+", default=[2, 4, 8], help="(b): cp degrees")
    parser.add_argument("--steps", type=int, default=6, help="(d), (e): optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="(d), (e): leading steps left out")
    parser.add_argument("--rounds", type=int, default=3, help="(d), (e): alternating rounds")
    parser.add_argument("--busy-threshold", type=float, default=0.25,
                        help="(d), (e): repeat a run during which other processes kept more cores than this busy")
    parser.add_argument("--retries", type=int, default=1, help="(d), (e): repeats of a busy run")
    parser.add_argument("--memory-goal", type=float, default=1.15)
    parser.add_argument("--balance-goal", type=float, default=1.02)
    parser.add_argument("--tolerance", type=float, default=0.05, help="(c): |measured / formula - 1| <= this")
    args = parser.parse_args(argv)
    if args.cps[0] != 1:
        parser.error("--cps must start with 1 (the reference of (a))")
    if args.steps <= args.warmup:
        parser.error("--steps must leave steps after --warmup")

    print(f"context_parallel: model=small, seq_len={args.seq_len}, micro batch 1, fp32, gloo, "
          f"{os.cpu_count()} CPUs", flush=True)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="titan-cp-") as tmp:
        records = {cp: memory_run(args, cp, Path(tmp)) for cp in args.cps}
        memory_met = print_memory(records, args.memory_goal)
        if 2 in records:
            print_breakdown(records, 2)
        balance_met = print_balance(args)
        medians, cp2_rows = time_contenders(args, Path(tmp))
    bytes_met = print_bytes(args, records, cp2_rows)
    print()
    print_ratio("(d) cp2 x 1 thread vs 1 rank x 2 threads", medians, "cp2x1", "single1x2")
    print_ratio("(e) document mask vs causal, 1 process", medians, "single1x2_docs", "single1x2")
    print(f"\ngoals: (a) memory ratio <= {args.memory_goal}: {'met' if memory_met else 'NOT met'}; "
          f"(b) balance <= {args.balance_goal}: {'met' if balance_met else 'NOT met'}; "
          f"(c) bytes within {args.tolerance:.0%}: {'met' if bytes_met else 'NOT met'}")
    print(f"total wall time {time.perf_counter() - began:.0f}s")


if __name__ == "__main__":
    main()
