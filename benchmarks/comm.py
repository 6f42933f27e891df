"""Communication bytes per step and mesh dimension, as the trainer logs them, against closed forms.

    python -m benchmarks.comm [--model small] [--seq-len 128] [--global-batch 8] [--micro-batch 2]
                              [--steps 2] [--layouts fsdp2,fsdp4,...] [--tolerance 0.05]

Each layout runs ``torchrun -m recipes.pretrain`` (gloo, fp32, one thread per rank) with
``logging.log_interval=1``; the numbers are the ``comm_gb/<dim>`` fields of ``metrics.jsonl``
(``parallel/comm_stats.py``: bytes one rank sends per step with ring algorithms; all-gather
``(n-1) x shard``, reduce-scatter ``(n-1)/n x input``, all-reduce ``2 (n-1)/n x input``).

The expected bytes are the planner's (`titan/planner/comm.py`): the closed forms of
``parallel/costs.py`` (FSDP / ZeRO-2 / hpZ all-gathers and reduce-scatters over the model's FSDP units,
the HSDP replica all-reduce, Megatron TP with and without sequence parallelism, CP's key/value
all-gathers and their gradients' reduce-scatters with the document-mask metadata) applied to the
layout, with ``comm_stats``'s naming (a group is named by the innermost dimension with the same ranks,
so with ``dp_shard = 1`` CP's FSDP bytes are logged under ``cp`` beside the attention's). The
loss-parallel and grad-norm reductions (a few vectors or scalars) are left out, under 0.2% here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.planner import plan_of

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Layout:
    ranks: int
    overrides: tuple[str, ...]
    note: str = ""


LAYOUTS: dict[str, Layout] = {
    "fsdp2": Layout(2, ()),
    "fsdp4": Layout(4, ()),
    "hsdp2x2": Layout(4, ("parallel.dp_replicate=2", "parallel.dp_shard=2")),
    "zero2": Layout(4, ("parallel.reshard_after_forward=false",)),
    "hpz": Layout(4, ("parallel.reshard_after_forward=2",)),
    "tp2_sp": Layout(2, ("parallel.tp=2", "parallel.sequence_parallel=true")),
    "tp2": Layout(2, ("parallel.tp=2", "parallel.sequence_parallel=false"), note="extra"),
    "cp2": Layout(2, ("parallel.cp=2",)),
    "cp2_fsdp2": Layout(4, ("parallel.cp=2", "parallel.dp_shard=2")),
    "cp2_docs": Layout(2, ("parallel.cp=2", "data.document_mask=true")),
    "pp2": Layout(2, ("parallel.pp=2",)),
}


def recipe_overrides(args: argparse.Namespace, layout: Layout) -> list[str]:
    return [f"model={args.model}", f"training.seq_len={args.seq_len}", f"training.global_batch_size={args.global_batch}",
            f"training.micro_batch_size={args.micro_batch}", *layout.overrides]


def expected(layout: Layout, args: argparse.Namespace) -> dict[str, float]:
    """The planner's bytes per step and `comm_gb` dimension on rank 0."""
    return plan_of(recipe_overrides(args, layout), layout.ranks).time.traffic_by_dim()


def run_layout(name: str, layout: Layout, args: argparse.Namespace, tmp: Path) -> list[dict]:
    run_dir = tmp / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={layout.ranks}",
           "-m", "recipes.pretrain", *recipe_overrides(args, layout), f"training.steps={args.steps}",
           "training.num_threads=1", "logging.log_interval=1", "eval.interval=0", "checkpoint.enabled=false",
           "logging.progress_bar=false", f"run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma list of {', '.join(LAYOUTS)}")
    parser.add_argument("--tolerance", type=float, default=0.05, help="goal: |measured / formula - 1| <= this")
    args = parser.parse_args(argv)
    names = [n for n in args.layouts.split(",") if n]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        parser.error(f"unknown layouts {unknown}; choose from {list(LAYOUTS)}")

    model = plan_of([f"model={args.model}"], 1).layout.cfg.model
    print(f"comm: model={args.model} (dim {model.dim}, {model.n_layers} layers, vocab {model.vocab_size}), "
          f"seq_len={args.seq_len}, global batch {args.global_batch}, micro batch {args.micro_batch}, "
          f"{args.steps} steps, fp32, gloo; bytes per rank and step (MB = 1e6 bytes)", flush=True)
    print(f"{'layout':9s} {'ranks':>5s} {'dim':13s} {'measured MB':>12s} {'formula MB':>11s} {'ratio':>7s}  goal")
    began, verdicts = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="titan-comm-") as tmp:
        for name in names:
            layout = LAYOUTS[name]
            rows = run_layout(name, layout, args, Path(tmp))
            want = expected(layout, args)
            keys = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("comm_gb/")} | set(want))
            for key in keys:
                got = [r.get(f"comm_gb/{key}", 0.0) * 1e9 for r in rows]
                if max(got) - min(got) > 1e-6 * max(max(got), 1.0):
                    print(f"  note: {name} {key} differs between steps: {got}")
                measured, formula = got[-1], want.get(key, 0.0)
                if not formula:  # e.g. the loss all-reduce on the flattened `dp` group: a few bytes
                    print(f"{name:9s} {layout.ranks:5d} {key:13s} {measured / 1e6:12.4f} {'-':>11s} {'-':>7s}  "
                          f"{'scalars only' if measured < 1e3 else 'UNEXPECTED'}", flush=True)
                    continue
                ratio = measured / formula
                ok = abs(ratio - 1) <= args.tolerance
                if layout.note != "extra":
                    verdicts.append(ok)
                print(f"{name:9s} {layout.ranks:5d} {key:13s} {measured / 1e6:12.4f} {formula / 1e6:11.4f} "
                      f"{ratio:7.4f}  {'met' if ok else 'NOT met'}{' (extra row)' if layout.note else ''}", flush=True)
    print(f"goal |measured / formula - 1| <= {args.tolerance:.0%}: {sum(verdicts)}/{len(verdicts)} rows met"
          f"{'' if all(verdicts) else ' (NOT met on all rows)'}")
    print(f"total wall time {time.perf_counter() - began:.0f}s")


if __name__ == "__main__":
    main()
