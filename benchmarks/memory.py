"""Peak memory per rank under FSDP over 1, 2 and 4 ranks (torchrun, gloo, fp32) against theory.

    python -m benchmarks.memory [--ranks 1 2 4] [--steps 3] [--seq-len 32] [--threads 1] [--goal 1.25]
                                [--model-args "model=debug model.dim=1024 ..."]

Each world size runs `benchmarks.memory_worker` under torchrun: the recipe's config, layout, model,
initialization, optimizer and `Trainer`, for a few steps with micro batch 1 and global batch = ranks,
on a ~160M-parameter model whose parameters and AdamW state dwarf the activations. Per rank it checks:

(a) Shard sizes. FSDP2 splits each parameter's dim 0 like ``torch.chunk`` into chunks of
    ``c = ceil(d0 / n)`` rows, so rank ``r`` holds ``rows_r = clamp(d0 - r c, 0, c)`` rows (the last
    ranks may hold fewer, or none) and every rank allocates a buffer padded to ``c`` rows. Checked
    exactly, on every rank: ``sum to_local().numel() x 4 == sum rows_r x numel / d0 x 4`` and the
    bytes of the storages behind the shards ``== sum c x numel / d0 x 4``; also on a tiny model with
    uneven first dimensions (509, 10 and 5 rows), where ranks hold short and empty chunks.
(b) Peak memory (live tensor bytes, see `benchmarks/memory_worker.py`) against the planner's peak
    (`python -m recipes.plan`, `titan/planner/memory.py`) without its runtime part: S = parameter,
    gradient and AdamW shards; A = activations and transients (the loss backward); U = FSDP's
    unsharded units and its gradient / reduce-scatter buffers of the largest unit.
    Goal: within 10% at every n, and the measured peak falls as the shards grow.
The peak RSS growth (VmHWM) is printed too, as a cross-check that sees what MemTracker cannot
(allocator slack, gloo's internal buffers, the init-time full-size draws).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.planner import plan_of
from titan.planner.facts import model_facts, unit_elements
from titan.planner.memory import RankMemory

REPO = Path(__file__).resolve().parents[1]
MODEL_ARGS = ("model=debug model.dim=1024 model.n_layers=8 model.n_heads=16 model.n_kv_heads=8 "
              "model.ffn_hidden_dim=2816 model.vocab_size=32000")
MB = 1e6


def recipe_overrides(args: argparse.Namespace, ranks: int) -> list[str]:
    return [*args.model_args.split(), f"training.seq_len={args.seq_len}", f"training.global_batch_size={ranks}",
            "training.micro_batch_size=1", f"training.steps={args.steps}", "eval.interval=0",
            "checkpoint.enabled=false", "logging.progress_bar=false", f"training.num_threads={args.threads}"]


def run_ranks(args: argparse.Namespace, ranks: int, tmp: Path) -> list[dict]:
    """One torchrun of the worker; the per-rank JSON records."""
    out = tmp / f"n{ranks}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           "-m", "benchmarks.memory_worker", "--out", str(out), *recipe_overrides(args, ranks)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"n={ranks} failed ({proc.returncode}):\n{' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def theory(args: argparse.Namespace, ranks: int) -> RankMemory:
    """The planner's peak of this run (its `runtime` part, outside tensors, is left out of the sums)."""
    return plan_of([*recipe_overrides(args, ranks), "cluster=cpu"], ranks).memory[0]


def shard_lines(records: list[dict]) -> tuple[list[str], bool]:
    """One line per rank: measured vs formula shard bytes of the big and the uneven model."""
    lines, ok = [], True
    for big in records:
        small = big["uneven"]
        exact = all(rec["local_bytes"] == rec["expected_local_bytes"]
                    and rec["storage_bytes"] == rec["expected_padded_bytes"] for rec in (big, small))
        ok &= exact
        lines.append(f"{big['shards']:>2d} {big['shard_rank']:>4d} {big['local_bytes']:>13,d} "
                     f"{big['expected_local_bytes']:>13,d} {big['storage_bytes']:>13,d} {small['local_bytes']:>8,d} "
                     f"{small['expected_local_bytes']:>8,d} {small['storage_bytes']:>8,d} "
                     f"{small['expected_padded_bytes']:>8,d}  {'exact' if exact else 'MISMATCH'}")
    return lines, ok


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="world sizes, in increasing order")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--goal", type=float, default=0.10, help="largest allowed |measured / planner - 1|")
    parser.add_argument("--model-args", default=MODEL_ARGS, help="recipe overrides that set the model shape")
    args = parser.parse_args(argv)

    facts = model_facts(plan_of(recipe_overrides(args, 1), 1).layout.cfg.model)
    largest = max(unit_elements(u, 1, 1, 1) for u in (facts.embedding, facts.head, facts.root, *(b.params for b in facts.blocks)))
    print(f"memory: {facts.params() / 1e6:.1f}M params (largest FSDP unit {largest / 1e6:.1f}M), "
          f"seq_len={args.seq_len}, micro batch 1, global batch = ranks, {args.steps} steps, fp32, "
          f"{args.threads} thread(s)/rank", flush=True)
    results: dict[int, list[dict]] = {}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="titan-mem-") as tmp:
        for ranks in args.ranks:
            t0 = time.perf_counter()
            results[ranks] = run_ranks(args, ranks, Path(tmp))
            print(f"  n={ranks}: {time.perf_counter() - t0:.0f}s", flush=True)

    print("\n(a) parameter shard bytes per rank (big model | uneven tiny model), measured vs chunk formula")
    print(f"{'n':>2s} {'rank':>4s} {'to_local':>13s} {'formula':>13s} {'storage':>13s} "
          f"{'to_local':>8s} {'formula':>8s} {'storage':>8s} {'padded':>8s}")
    all_exact = True
    for ranks in args.ranks:
        lines, ok = shard_lines(results[ranks])
        all_exact &= ok
        print("\n".join(lines))

    print("\n(b) peak memory per rank (MB = 1e6 bytes), measured (live tensor bytes) vs the planner "
          "(S = params + grads + optimizer, A = activations + transients, U = FSDP buffers)")
    print(f"{'n':>2s} {'measured':>9s} {'params':>7s} {'grads':>7s} {'optim':>7s} {'temp+act':>8s} "
          f"{'S':>7s} {'A':>5s} {'U':>6s} {'planner':>7s} {'ratio':>6s} {'RSS peak':>9s} {'RSS/planner':>11s}")
    ratios, peaks = [], []
    for ranks in args.ranks:
        recs = results[ranks]
        top = max(recs, key=lambda r: r["tracker_peak"]["Total"])
        peak = top["tracker_peak"]
        th = theory(args, ranks)
        states, acts, total = th.params + th.grads + th.optimizer, th.activations + th.transient, th.peak - th.runtime
        rss = max(r["rss_peak_delta_bytes"] for r in recs)
        ratio = peak["Total"] / total
        ratios.append(ratio)
        peaks.append(peak["Total"])
        print(f"{ranks:>2d} {peak['Total'] / MB:9.1f} {peak['Parameter'] / MB:7.1f} {peak['Gradient'] / MB:7.1f} "
              f"{peak['Optstate'] / MB:7.1f} {(peak['Temp'] + peak['Activation']) / MB:8.1f} {states / MB:7.1f} "
              f"{acts / MB:5.1f} {th.gathered / MB:6.1f} {total / MB:7.1f} {ratio:6.3f} {rss / MB:9.1f} "
              f"{rss / total:11.3f}")
    falls = all(b < a for a, b in zip(peaks, peaks[1:]))
    print(f"\nshard bytes equal the chunk formula on every rank: {'yes' if all_exact else 'NO'}")
    met = all(abs(r - 1) <= args.goal for r in ratios)
    print(f"measured / planner: {', '.join(f'n={n}: {r:.3f}' for n, r in zip(args.ranks, ratios))}; "
          f"goal within {args.goal:.0%}: {'met' if met else 'NOT met'}")
    print(f"peak falls as shards grow ({' > '.join(f'{p / MB:.0f}' for p in peaks)} MB): {'yes' if falls else 'NO'}; "
          f"n={args.ranks[-1]} / n={args.ranks[0]}: {peaks[-1] / peaks[0]:.3f}")
    print(f"total wall time {time.perf_counter() - began:.0f}s")
    if not all_exact:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
