"""Shared test helpers: run a recipe as a real subprocess and read what it wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

FAST = ["model=debug", "training.seq_len=64", "training.global_batch_size=8", "training.micro_batch_size=4",
        "training.num_threads=1", "logging.progress_bar=false"]


REPO_ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(extra: dict | None = None) -> dict:
    """One thread per process, W&B quiet, and this source tree importable whatever is installed."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "PYTHONPATH": path, **(extra or {})}


def run_recipe(module: str, args: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m <module> args` in a subprocess with one thread; never hangs past `timeout`."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(env))


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run_torchrun(nproc: int, module: str | None, args: list[str], timeout: float = 300,
                 env: dict | None = None, script: str | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N (-m <module> | <script>) args`, one thread per rank,
    with a timeout."""
    target = [script] if script else ["-m", module]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *target, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=subprocess_env(env))


def assert_curves_match(reference: list[dict], got: list[dict], rtol: float = 1e-4,
                        keys: tuple[str, ...] = ("loss", "grad_norm")) -> None:
    """Same logged steps, and each key within `rtol` relative of the reference."""
    assert [r["step"] for r in got] == [r["step"] for r in reference]
    for ref, row in zip(reference, got):
        for key in keys:
            if key in ref:
                assert abs(row[key] - ref[key]) <= rtol * abs(ref[key]), (row["step"], key, row[key], ref[key])


def assert_exactly_once(run_dirs: list[Path], steps: int, global_batch: int) -> None:
    """Runs that overlap (a run and its resume) drew the same global batch at each shared step, and
    together saw every sequence of steps 1..`steps` exactly once (`logging.sequence_ids=true`)."""
    ids: dict[int, list[list[int]]] = {}
    for run_dir in run_dirs:
        for line in (run_dir / "sequence_ids.jsonl").read_text().splitlines():
            row = json.loads(line)
            ids.setdefault(row["step"], []).append(row["ids"])
    assert all(len({tuple(i) for i in batches}) == 1 for batches in ids.values())  # the same batch on every run
    seen = [i for step in range(1, steps + 1) for i in ids[step][-1]]
    assert len(seen) == len(set(seen)) == steps * global_batch


def single_process_metrics(run_dir: Path, args: list[str]) -> list[dict]:
    """Metrics of a one-process `recipes.pretrain` run: the reference every layout must match."""
    proc = run_recipe("recipes.pretrain", [*args, f"run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr
    return read_metrics(run_dir)


def layout_metrics_matching(reference: list[dict], nproc: int, args: list[str], run_dir: Path) -> list[dict]:
    """Run `args` under torchrun and check its loss, grad-norm, eval-loss and lr curves and token
    counts against `reference` (1e-4 relative); returns its metrics."""
    proc = run_torchrun(nproc, "recipes.pretrain", [*args, f"run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = read_metrics(run_dir)
    assert_curves_match(reference, got, rtol=1e-4, keys=("loss", "grad_norm", "eval_loss", "lr"))
    # Only one rank writes: one row per step, and the tokens count the whole global batch.
    assert [r["tokens"] for r in got] == [r["tokens"] for r in reference]
    return got


def free_port() -> int:
    """A TCP port nobody listens on right now (for a rendezvous endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.05)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def child_pids(agent) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


class Launched:
    """A background process whose output goes to files (a pipe nobody reads would fill and block it)."""

    def __init__(self, cmd: list[str], log_dir: Path, env: dict | None = None, **kwargs):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = log_dir / "stdout.log", log_dir / "stderr.log"
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=subprocess_env(env),
                                         **kwargs)
        self.pid = self.proc.pid

    def communicate(self, timeout: float) -> tuple[str, str]:
        self.proc.wait(timeout=timeout)
        return self.out_path.read_text(), self.err_path.read_text()

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.kill()
