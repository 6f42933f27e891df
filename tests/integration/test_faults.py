"""Faults a careful user runs into, driven as the user would: two runs in one folder, Ctrl-C, a
learning rate that blows up, changed settings on resume, an unwritable run.dir, W&B without a login.
Each checks the exit code, the message (key or file named, a fix given, no traceback) and that
nothing on disk is lost or mixed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.helpers import FAST, Launched, free_port, logged_steps, run_recipe, wait_for
from titan.checkpoint import CheckpointManager

QUICK = [*FAST, "eval.interval=0", "logging.log_interval=1"]


def strict_rows(path: Path) -> list[dict]:
    """Every line parses as standard JSON (no bare NaN / Infinity)."""
    def refuse(constant: str):
        raise AssertionError(f"non-standard JSON constant {constant} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def committed_tensors_finite(step_dir: Path, tmp: Path) -> bool:
    CheckpointManager.verify(step_dir)
    out = tmp / f"{step_dir.name}.pt"
    dcp_to_torch_save(step_dir, out)
    state = torch.load(out, weights_only=False)

    def tensors(node):
        if isinstance(node, torch.Tensor):
            yield node
        elif isinstance(node, dict):
            for value in node.values():
                yield from tensors(value)

    return all(bool(torch.isfinite(t).all()) for t in tensors(state) if t.is_floating_point())


def start(args: list[str], run_dir: Path, name: str) -> Launched:
    return Launched([sys.executable, "-m", "recipes.pretrain", *args, f"run.dir={run_dir}"],
                    run_dir.parent / f"{run_dir.name}-{name}")


def test_run_owns_its_folder_ctrl_c_saves_and_torn_metrics_line_is_survived(tmp_path):
    run_dir = tmp_path / "run"
    first = start([*QUICK, "training.steps=100000"], run_dir, "first")
    try:
        wait_for(lambda: logged_steps(run_dir) >= 2, 120)
        second = run_recipe("recipes.pretrain", [*QUICK, "training.steps=5", f"run.dir={run_dir}"], timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert "config error at `run.dir`" in second.stderr and "in use by another run" in second.stderr
        assert f"pid {first.pid}" in second.stderr and socket.gethostname() in second.stderr
        assert "Traceback" not in second.stderr
        os.kill(first.pid, signal.SIGINT)  # Ctrl-C: save at the step end, then stop
        out, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "Ctrl-C: saving a checkpoint" in err
    assert "stopped (Ctrl-C): checkpoint of step" in out
    saved = CheckpointManager(run_dir, 2, False).latest()
    assert saved is not None and (saved / "COMMITTED").is_file()
    step = int(saved.name.split("-")[1])
    assert [r["step"] for r in strict_rows(run_dir / "metrics.jsonl")][-1] == step

    # A writer killed mid-line leaves a torn last line: the resume drops it (with a warning) and goes on.
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": %d, "loss": 2.' % (step + 1))
    proc = run_recipe("recipes.pretrain", [*QUICK, f"training.steps={step + 2}", f"run.dir={run_dir}"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resumed from {saved}" in proc.stdout and "not a complete JSON record" in proc.stdout
    assert [r["step"] for r in strict_rows(run_dir / "metrics.jsonl")][-3:] == [step, step + 1, step + 2]


def test_second_ctrl_c_stops_at_once_and_the_lock_goes_with_the_process(tmp_path):
    run_dir = tmp_path / "run"
    slow_steps = ["model.dim=256", "model.n_layers=4", "model.ffn_hidden_dim=768", "training.seq_len=256"]
    proc = start([*QUICK, *slow_steps, "training.steps=100000", "checkpoint.interval=1"], run_dir, "run")
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "step-1" / "COMMITTED").is_file(), 120)
        proc.proc.send_signal(signal.SIGINT)
        wait_for(lambda: "Ctrl-C: saving" in proc.err_path.read_text(), 60)
        proc.proc.send_signal(signal.SIGINT)  # mid-step: a step of this model takes about a second
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert "again: stopped without saving" in err
    assert CheckpointManager(run_dir, 2, False).latest() is not None
    rerun = run_recipe("recipes.pretrain", [*QUICK, *slow_steps, "training.steps=1", f"run.dir={run_dir}"],
                       timeout=120)
    assert rerun.returncode == 0 and "resumed from" in rerun.stdout, rerun.stderr[-2000:]


def test_blown_up_step_is_never_applied_or_committed_and_new_lr_takes_effect(tmp_path):
    run_dir = tmp_path / "run"
    common = [*QUICK, "lr.warmup_steps=0", "lr.schedule=constant", "training.grad_clip=0", "checkpoint.interval=1",
              "checkpoint.keep=20", f"run.dir={run_dir}"]
    assert run_recipe("recipes.pretrain", [*common, "training.steps=2"]).returncode == 0
    blown = run_recipe("recipes.pretrain", [*common, "training.steps=12", "optim.lr=1e6", "training.health.policy=fail"])
    assert blown.returncode == 5, blown.stderr[-2000:]
    assert "optim.lr: 0.003 -> 1000000.0" in blown.stdout  # the changed setting is listed and used
    assert "gradient norm is nan" in blown.stderr and "update was not applied" in blown.stderr
    assert "lower optim.lr" in blown.stderr and "Traceback" not in blown.stderr
    rows = strict_rows(run_dir / "metrics.jsonl")
    failed_step = int(blown.stderr.split("error: step ")[1].split(":")[0])
    assert rows[-1]["step"] == failed_step - 1 and all(r["lr"] == 1e6 for r in rows[2:])
    committed = CheckpointManager(run_dir, 20, False).committed()
    assert [int(p.name.split("-")[1]) for p in committed] == list(range(1, failed_step))
    assert all(committed_tensors_finite(p, tmp_path) for p in committed)

    # Back to the last good step with a sane learning rate: it trains on with the new value.
    resumed = run_recipe("recipes.pretrain", [*common, "training.steps=4", "optim.lr=1e-3",
                                              f"checkpoint.resume={committed[1]}"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "optim.lr: 0.003 -> 0.001" in resumed.stdout and "training.steps: 2 -> 4" in resumed.stdout
    tail = strict_rows(run_dir / "metrics.jsonl")[-2:]
    assert [r["step"] for r in tail] == [3, 4] and all(r["lr"] == pytest.approx(1e-3) for r in tail)


@pytest.fixture
def read_only_dir(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({mounted.stderr.strip() or 'not root'})")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_unwritable_run_dir_is_refused_before_any_work(tmp_path, read_only_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for run_dir in (read_only_dir / "run", blocker / "run"):
        proc = run_recipe("recipes.pretrain", [*QUICK, "training.steps=2", f"run.dir={run_dir}"], timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "config error at `run.dir`" in proc.stderr and str(run_dir) in proc.stderr
        assert "cannot be written" in proc.stderr and "Traceback" not in proc.stderr


def test_wandb_without_key_or_server_is_refused_before_anything_is_written(tmp_path):
    no_key = {"HOME": str(tmp_path), "NETRC": str(tmp_path / "no-netrc"), "WANDB_API_KEY": "", "WANDB_MODE": ""}
    unreachable = {**no_key, "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}"}
    for name, env, problem in (("nokey", no_key, "no W&B API key"), ("noserver", unreachable, "cannot be reached")):
        run_dir = tmp_path / name
        proc = run_recipe("recipes.pretrain", [*QUICK, "training.steps=2", "logging.wandb.enabled=true",
                                               f"run.dir={run_dir}"], timeout=120, env=env)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "config error at `logging.wandb.mode`" in proc.stderr and problem in proc.stderr
        assert "wandb login" in proc.stderr and "logging.wandb.mode=offline" in proc.stderr
        assert "Traceback" not in proc.stderr and not run_dir.exists()


def test_metrics_survive_a_wandb_failure_mid_run(tmp_path, capsys):
    from titan.metrics import JsonlSink, MetricsLogger, WandbSink

    class GoneServer:
        id = "run-1"

        def log(self, *args, **kwargs):
            raise ConnectionError("server went away")

        def finish(self):
            raise ConnectionError("server went away")

    sink = WandbSink.__new__(WandbSink)
    sink.run, sink.run_id, sink.failed = GoneServer(), "run-1", False
    metrics = MetricsLogger([sink, JsonlSink(tmp_path / "metrics.jsonl", append=False)])
    for step in (1, 2):
        metrics.log({"step": step, "loss": float("nan") if step == 2 else 1.0})
    metrics.close()
    assert capsys.readouterr().out.count("W&B stopped working") == 1
    assert strict_rows(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": None}]
