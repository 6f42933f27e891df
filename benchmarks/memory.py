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
(b) Peak memory (``MemTracker``, see `benchmarks/memory_worker.py`) against
    ``theory = S + A + U``:
    S = (params + grads + 2 Adam moments) x 4 bytes / shards: 16 x the padded shard elements;
    A = activations autograd saves for one micro-batch (per token and block: 10 dim + 4 kv_dim
        + 4 ffn_hidden floats; per token: 2 vocab floats for the logits and log-softmax);
    U = (n > 1) the unit buffers at the largest unit's reduce-scatter, the largest moment: FSDP2 holds
        the unit's full-size gradients and copies them into one flat reduce-scatter input, so
        2 x the full bytes of the largest FSDP unit (`benchmarks/fsdp_units.py`: here the head,
        final norm + output, or the embedding; each its own unit since the root split).
    Goal: measured / theory <= 1.25 at every n, and the measured peak falls as the shards grow.
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

from benchmarks.fsdp_units import Units, model_units, shard_bytes

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


def activation_bytes(m, tokens: int) -> int:
    """fp32 bytes autograd saves for `tokens` tokens of one micro-batch (see the module docstring)."""
    kv_dim = m.n_kv_heads * (m.dim // m.n_heads)
    per_token = m.n_layers * (10 * m.dim + 4 * kv_dim + 4 * m.ffn_hidden_dim) + 2 * m.vocab_size
    return 4 * tokens * per_token


def theory(cfg, units: Units, shards: int) -> dict[str, float]:
    states = 4 * units.shard_bytes(shards)
    acts = activation_bytes(cfg.model, cfg.training.micro_batch_size * cfg.training.seq_len)
    largest_unit = max(shard_bytes(unit, 1) for unit in units.all)
    units = 2 * largest_unit if shards > 1 else 0
    return {"S": states, "A": acts, "U": units, "total": states + acts + units}


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
    parser.add_argument("--goal", type=float, default=1.25, help="largest allowed measured / theory")
    parser.add_argument("--model-args", default=MODEL_ARGS, help="recipe overrides that set the model shape")
    args = parser.parse_args(argv)

    cfg, units = model_units(recipe_overrides(args, 1))
    n_params = units.params()
    largest = max(units.all, key=lambda unit: shard_bytes(unit, 1))
    print(f"memory: {n_params / 1e6:.1f}M params (largest FSDP unit {shard_bytes(largest, 1) / 4e6:.1f}M), "
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

    print("\n(b) peak memory per rank (MB = 1e6 bytes), MemTracker peak vs theory S + A + U")
    print(f"{'n':>2s} {'measured':>9s} {'params':>7s} {'grads':>7s} {'optim':>7s} {'temp+act':>8s} "
          f"{'S':>7s} {'A':>5s} {'U':>6s} {'theory':>7s} {'ratio':>6s} {'RSS peak':>9s} {'RSS/theory':>10s}")
    ratios, peaks = [], []
    for ranks in args.ranks:
        recs = results[ranks]
        top = max(recs, key=lambda r: r["tracker_peak"]["Total"])
        peak = top["tracker_peak"]
        th = theory(cfg, units, ranks)
        rss = max(r["rss_peak_delta_bytes"] for r in recs)
        ratio = peak["Total"] / th["total"]
        ratios.append(ratio)
        peaks.append(peak["Total"])
        print(f"{ranks:>2d} {peak['Total'] / MB:9.1f} {peak['Parameter'] / MB:7.1f} {peak['Gradient'] / MB:7.1f} "
              f"{peak['Optstate'] / MB:7.1f} {(peak['Temp'] + peak['Activation']) / MB:8.1f} {th['S'] / MB:7.1f} "
              f"{th['A'] / MB:5.1f} {th['U'] / MB:6.1f} {th['total'] / MB:7.1f} {ratio:6.3f} {rss / MB:9.1f} "
              f"{rss / th['total']:10.3f}")
    falls = all(b < a for a, b in zip(peaks, peaks[1:]))
    print(f"\nshard bytes equal the chunk formula on every rank: {'yes' if all_exact else 'NO'}")
    print(f"measured / theory: {', '.join(f'n={n}: {r:.3f}' for n, r in zip(args.ranks, ratios))}; "
          f"goal <= {args.goal:.2f}: {'met' if max(ratios) <= args.goal else 'NOT met'}")
    print(f"peak falls as shards grow ({' > '.join(f'{p / MB:.0f}' for p in peaks)} MB): {'yes' if falls else 'NO'}; "
          f"n={args.ranks[-1]} / n={args.ranks[0]}: {peaks[-1] / peaks[0]:.3f}")
    print(f"total wall time {time.perf_counter() - began:.0f}s")
    if not all_exact:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
