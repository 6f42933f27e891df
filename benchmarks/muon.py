"""Muon against AdamW on the main job: loss at equal tokens and the optimizer's cost per step.

    python -m benchmarks.muon [--steps 400] [--threads 2] [--model small]

Runs ``python -m recipes.pretrain`` twice on the same model, data, seed and schedule (cosine, the
default warmup), once with ``optim=adamw`` (its defaults) and once with ``optim=muon`` (its
defaults: Muon lr 0.02 with the spectral scaling for the blocks' matrices, AdamW at the same
``optim.lr`` for the rest), one process each, one after the other. It prints the training loss
(mean of the last 10 steps), the held-out loss at the end (same tokens for both), and the median
step time of each with the ratio muon / adamw (the orthogonalization's overhead on this machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(optim: str, args: argparse.Namespace, run_dir: Path) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "recipes.pretrain", f"model={args.model}", f"optim={optim}",
         f"training.steps={args.steps}", f"training.num_threads={args.threads}", "logging.log_interval=1",
         f"eval.interval={args.steps}", "eval.steps=8", "checkpoint.enabled=false", "logging.progress_bar=false",
         f"run.dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads),
                                                      "WANDB_MODE": "disabled"})
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summary(rows: list[dict]) -> dict[str, float]:
    timed = rows[5:]
    return {"loss": statistics.mean(r["loss"] for r in rows[-10:]),
            "eval_loss": next(r["eval_loss"] for r in reversed(rows) if "eval_loss" in r),
            "step_s": statistics.median(r["tokens"] / r["step"] / r["tokens_per_s"] for r in timed),
            "tokens": rows[-1]["tokens"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--model", default="small")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="titan-muon-") as tmp:
        results = {optim: summary(run(optim, args, Path(tmp) / optim)) for optim in ("adamw", "muon")}
    for optim, r in results.items():
        print(f"{optim:6s} loss {r['loss']:.4f} (mean of the last 10 steps), eval_loss {r['eval_loss']:.4f} "
              f"after {r['tokens']:,} tokens; step {r['step_s'] * 1e3:.0f} ms (median)")
    a, m = results["adamw"], results["muon"]
    print(f"muon - adamw: loss {m['loss'] - a['loss']:+.4f}, eval_loss {m['eval_loss'] - a['eval_loss']:+.4f}; "
          f"step time muon / adamw {m['step_s'] / a['step_s']:.3f}")


if __name__ == "__main__":
    main()
