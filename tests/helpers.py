"""Shared test helpers: run a recipe as a real subprocess and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

FAST = ["model=debug", "training.seq_len=64", "training.global_batch_size=8", "training.micro_batch_size=4",
        "training.num_threads=1", "logging.progress_bar=false"]


def run_recipe(module: str, args: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m <module> args` in a subprocess with one thread; never hangs past `timeout`."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
