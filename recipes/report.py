"""What a run did: `python -m recipes.report <run.dir> [out=<dir>]` prints a summary (steps, tokens,
throughput and MFU, losses, skipped steps and rollbacks, stragglers, checkpoints, resumes, and
whether the run finished, is running or crashed) and writes PNG plots into `<run.dir>/report/` (or
`out`): loss.png (loss and eval loss), lr.png, grad_norm.png (skipped steps marked), throughput.png
(tokens/s and MFU), step_time.png (per-rank step times as a heat map), comm.png (communication per
mesh dimension) and, for a pipeline-parallel run, pipeline.png (one step of its schedule). A plot
without data is skipped with a line saying so. Works on a finished, running or crashed run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from recipes.cli import fail
from titan.plots import write_plots
from titan.report import NotARunError, read_run, summary

USAGE = "python -m recipes.report <run.dir> [out=<dir>] [--help]"


def parse(argv: list[str]) -> tuple[Path, Path]:
    """The run folder and the folder to write the plots into."""
    if "--help" in argv or "-h" in argv:
        print(f"usage: {USAGE}\n\n{__doc__.strip()}")
        raise SystemExit(0)
    outs = [a.split("=", 1)[1] for a in argv if a.startswith("out=")]
    rest = [a for a in argv if not a.startswith("out=")]
    if len(rest) != 1 or len(outs) > 1 or rest[0].startswith("-") or "=" in rest[0]:
        fail(f"expected one run folder and at most one out=<dir>, got {' '.join(argv) or 'nothing'}. Fix: {USAGE}.")
    run_dir = Path(rest[0]).expanduser()
    return run_dir, Path(outs[0]).expanduser() if outs else run_dir / "report"


def main(argv: list[str]) -> None:
    run_dir, out = parse(argv)
    try:
        run = read_run(run_dir)
    except NotARunError as exc:
        fail(f"{exc} Fix: pass the run.dir of a `recipes.pretrain` run (the folder holding its config.yaml "
             "and metrics.jsonl).")
    print("\n".join(summary(run)))
    try:
        lines = write_plots(run, out)
    except OSError as exc:
        fail(f"cannot write the plots into {out} ({exc.strerror or exc}). Fix: pass out=<a writable folder>.")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
