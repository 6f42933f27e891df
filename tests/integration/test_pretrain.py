"""A real `python -m recipes.pretrain` run: loss falls, contract files and fields, resume, float8."""

from __future__ import annotations

import re
import shutil

import pytest
import yaml
from torch.distributed.checkpoint import FileSystemReader

from tests.helpers import FAST, read_metrics, run_recipe, run_torchrun

CONTRACT_FIELDS = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "tflops", "mfu", "mem_gb"}


def test_debug_run_learns_and_writes_contract_files(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_recipe("recipes.pretrain", [*FAST, "training.steps=30", "logging.log_interval=5",
                                           "eval.interval=15", f"run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    for row in rows:
        assert CONTRACT_FIELDS <= row.keys()
        assert row["tokens"] == row["step"] * 8 * 64
        assert row["tokens_per_s"] > 0 and row["tflops"] > 0 and 0 < row["mfu"] < 1 and row["mem_gb"] > 0
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0, [r["loss"] for r in rows]
    assert [r["step"] for r in rows if "eval_loss" in r] == [15, 30]
    assert rows[-1]["eval_loss"] < rows[2]["eval_loss"]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["name"] == "debug" and config["run"]["dir"] == str(run_dir)
    assert "${" not in (run_dir / "config.yaml").read_text()
    assert (run_dir / "checkpoints" / "step-30" / "COMMITTED").is_file()
    assert str(run_dir) in proc.stdout
    assert "auto settings on cpu: training.compile=false, checkpoint.async_save=false" in proc.stdout
    assert re.search(r"MFU peak [\d.]+ TFLOP/s per rank: 1 thread\(s\) x [\d.]+ GHz x \d+ fp32 FLOP/cycle", proc.stdout)


def test_resume_on_same_layout_matches_uninterrupted_run(tmp_path):
    common = [*FAST, "training.steps=10", "logging.log_interval=1", "eval.interval=0", "lr.warmup_steps=3"]
    full = tmp_path / "full"
    proc = run_recipe("recipes.pretrain", [*common, "checkpoint.interval=5", "checkpoint.keep=3", f"run.dir={full}"])
    assert proc.returncode == 0, proc.stderr
    # Resume from the step-5 checkpoint in a fresh run dir, as after a crash at step 7.
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step-5", resumed / "checkpoints" / "step-5")
    proc = run_recipe("recipes.pretrain", [*common, f"run.dir={resumed}"])
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout
    expected = {r["step"]: r for r in read_metrics(full)}
    got = read_metrics(resumed)
    assert [r["step"] for r in got] == list(range(6, 11))
    for row in got:
        assert row["loss"] == expected[row["step"]]["loss"]
        assert row["grad_norm"] == expected[row["step"]]["grad_norm"]
        assert row["lr"] == expected[row["step"]]["lr"]


def test_rerun_of_finished_run_does_nothing(tmp_path):
    args = [*FAST, "training.steps=2", "eval.interval=0", f"run.dir={tmp_path}"]
    assert run_recipe("recipes.pretrain", args).returncode == 0
    proc = run_recipe("recipes.pretrain", args)
    assert proc.returncode == 0 and "already complete" in proc.stdout
    assert len(read_metrics(tmp_path)) == 1


def test_installed_package_runs_from_any_directory(tmp_path):
    """A non-editable install finds its configs as package data, wherever the user stands."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    target = tmp_path / "site"
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(repo)], check=True, capture_output=True, timeout=300)
    shutil.rmtree(repo / "build", ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "recipes.pretrain", *FAST, "training.steps=2", "eval.interval=0",
                           f"run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert str(target / "recipes" / "_configs") in subprocess.run(
        [sys.executable, "-c", "import recipes.cli as c; print(c.config_dir())"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=60).stdout


def test_float8_fsdp_run_learns_and_resumes_without_float8(tmp_path):
    """float8 block linears under 2-rank FSDP (float8 all-gathers), then a one-process resume with
    float8 off: the checkpoint holds the plain keys and tensors (this process never imports torchao);
    then the same run under tp2."""
    pytest.importorskip("torchao.float8", reason="training.float8 needs torchao: pip install .[float8]")
    common = [*FAST, "logging.log_interval=5", "eval.interval=0", f"run.dir={tmp_path}"]
    proc = run_torchrun(2, "recipes.pretrain", [*common, "training.steps=15", "training.float8=true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "float8: 14 block linears (on this rank) train with torchao Float8Linear" in proc.stdout  # 2 x q/k/v/o/w1/w2/w3
    rows = read_metrics(tmp_path)
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0, [r["loss"] for r in rows]
    proc = run_recipe("recipes.pretrain", [*common, "training.steps=20"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "training.float8: True -> False" in proc.stdout
    assert [r["step"] for r in read_metrics(tmp_path)] == [5, 10, 15, 20]
    keys = {step: set(FileSystemReader(tmp_path / "checkpoints" / f"step-{step}").read_metadata().state_dict_metadata)
            for step in (15, 20)}
    assert keys[15] == keys[20] and "model.layers.0.attention.wq.weight" in keys[15]
    # Tensor parallelism with torchao's float8 styles: the FSDP run's curve (float8 rounding apart).
    tp_dir = tmp_path / "tp2"
    proc = run_torchrun(2, "recipes.pretrain", [*common[:-1], "training.steps=15", "training.float8=true",
                                                "parallel.tp=2", "checkpoint.enabled=false", f"run.dir={tp_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "float8: 14 block linears (on this rank)" in proc.stdout  # each tp rank holds a shard of all 14
    assert [r["loss"] for r in read_metrics(tp_dir)] == pytest.approx([r["loss"] for r in rows], rel=1e-3)
