"""Checkpoints through real torchrun runs: reshaping resume with exactly-once data, same-layout
bit-identical resume, corruption, incompatible shapes, preemption, crashes and elastic restarts."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import (Launched, assert_curves_match, child_pids, logged_steps, read_metrics, run_recipe,
                           run_torchrun, wait_for)
from titan.checkpoint import CheckpointManager

COMMON = ["model=debug", "model.n_layers=4", "training.steps=8", "training.seq_len=64", "training.global_batch_size=16",
          "training.micro_batch_size=2", "training.num_threads=1", "logging.log_interval=1", "eval.interval=0",
          "logging.progress_bar=false", "lr.schedule=constant", "lr.warmup_steps=0", "logging.sequence_ids=true"]


def sequence_ids(run_dir: Path) -> dict[int, list[int]]:
    rows = [json.loads(line) for line in (run_dir / "sequence_ids.jsonl").read_text().splitlines()]
    return {r["step"]: r["ids"] for r in rows}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """FSDP over 4 ranks, 8 steps, a checkpoint every 4."""
    run_dir = tmp_path_factory.mktemp("fsdp4")
    proc = run_torchrun(4, "recipes.pretrain", [*COMMON, "checkpoint.interval=4", "checkpoint.keep=3",
                                                f"run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


RESHAPES = {
    "tp2_pp2_interleaved": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b",
                                "parallel.pp_virtual_stages=2", "parallel.sequence_parallel=true"]),
    "fsdp2": (2, []),
    "single": (1, []),
    "cp2_tp2": (4, ["parallel.cp=2", "parallel.tp=2"]),
}


@pytest.mark.parametrize("name", list(RESHAPES))
def test_resume_on_another_layout_continues_the_curve_with_exactly_once_data(name, uninterrupted, tmp_path):
    nproc, extra = RESHAPES[name]
    args = [*COMMON, *extra, f"checkpoint.resume={uninterrupted / 'checkpoints' / 'step-4'}", f"run.dir={tmp_path}"]
    proc = run_torchrun(nproc, "recipes.pretrain", args) if nproc > 1 else run_recipe("recipes.pretrain", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = [r for r in read_metrics(uninterrupted) if r["step"] > 4]
    assert_curves_match(expected, read_metrics(tmp_path), rtol=1e-4, keys=("loss", "grad_norm"))
    before, after, full = sequence_ids(uninterrupted), sequence_ids(tmp_path), sequence_ids(uninterrupted)
    assert sorted(after) == [5, 6, 7, 8]
    for step in range(5, 9):
        assert after[step] == full[step]  # the same global batch, in the same order
    seen = [i for step in range(1, 5) for i in before[step]] + [i for step in range(5, 9) for i in after[step]]
    assert len(seen) == len(set(seen)) == 8 * 16  # nothing skipped or repeated (the corpus has more windows)


def test_same_layout_resume_is_bit_identical(uninterrupted, tmp_path):
    args = [*COMMON, f"checkpoint.resume={uninterrupted / 'checkpoints' / 'step-4'}", f"run.dir={tmp_path}"]
    proc = run_torchrun(4, "recipes.pretrain", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = {r["step"]: r for r in read_metrics(uninterrupted)}
    for row in read_metrics(tmp_path):
        assert row["loss"] == expected[row["step"]]["loss"] and row["grad_norm"] == expected[row["step"]]["grad_norm"]


def _copy_run(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    return dst


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor bytes: same size, DCP loads it without complaint
    path.write_bytes(bytes(data))


CORRUPTIONS = {"truncated": lambda p: p.write_bytes(p.read_bytes()[:-7]), "altered": _flip_a_byte}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_shard_is_named_and_previous_commit_used_when_asked(uninterrupted, tmp_path, corruption):
    run_dir = _copy_run(uninterrupted, tmp_path / "run")
    shard = sorted((run_dir / "checkpoints" / "step-8").glob("__1_*.distcp"))[0]
    CORRUPTIONS[corruption](shard)
    args = [*COMMON, "training.steps=10", "logging.sequence_ids=false", f"run.dir={run_dir}"]
    proc = run_torchrun(4, "recipes.pretrain", args, timeout=180)
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]  # a config error, before any step
    assert shard.name in proc.stderr and corruption in proc.stderr, proc.stderr[-2000:]
    assert "checkpoint.on_corrupt=previous" in proc.stderr
    assert read_metrics(run_dir) == read_metrics(uninterrupted)  # nothing trained on a partly loaded state
    if corruption == "truncated":
        return  # the fallback below is the same whatever the damage: checked once
    proc = run_torchrun(4, "recipes.pretrain", [*args, "checkpoint.on_corrupt=previous"], timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step-4" in proc.stdout
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 11))  # rows after step 4 were rewritten by the rerun
    expected = {r["step"]: r for r in read_metrics(uninterrupted)}
    assert all(rows[i]["loss"] == expected[i + 1]["loss"] for i in range(8))


def test_checkpoint_of_another_model_shape_is_refused(uninterrupted, tmp_path):
    args = [*COMMON, "model.dim=128", f"checkpoint.resume={uninterrupted / 'checkpoints' / 'step-4'}",
            f"run.dir={tmp_path}"]
    proc = run_recipe("recipes.pretrain", args, timeout=120)
    assert proc.returncode == 2
    assert "config error at `model.dim`" in proc.stderr and "128" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    args = [*COMMON, "training.steps=400", "logging.sequence_ids=false", f"run.dir={tmp_path}"]
    proc = Launched([sys.executable, "-m", "recipes.pretrain", *args], tmp_path.parent / f"{tmp_path.name}-logs")
    try:
        wait_for(lambda: logged_steps(tmp_path) >= 3, 120)
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "preempted" in out
    assert not (tmp_path / "hang").exists()  # a preemption on time is no hang: no stack dumps
    steps = [int(p.name.split("-")[1]) for p in (tmp_path / "checkpoints").glob("step-*")]
    assert len(steps) == 1 and 3 <= steps[0] < 400 and steps[0] == read_metrics(tmp_path)[-1]["step"]


def _torchrun_popen(nproc: int, args: list[str], extra: list[str] = (), log_dir: Path | None = None) -> Launched:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *extra,
           "-m", "recipes.pretrain", *args]
    run_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("run.dir=")))
    return Launched(cmd, log_dir or run_dir.parent / f"{run_dir.name}-logs")


def test_killed_worker_restarts_and_finishes_on_the_same_curve(uninterrupted, tmp_path):
    args = [*COMMON, "checkpoint.interval=2", "logging.sequence_ids=false", f"run.dir={tmp_path}"]
    agent = _torchrun_popen(4, args, ["--max-restarts=1"])
    try:
        wait_for(lambda: logged_steps(tmp_path) >= 5, 180)
        os.kill(child_pids(agent)[-1], signal.SIGKILL)
        out, err = agent.communicate(timeout=300)
    finally:
        agent.kill()
    assert agent.returncode == 0, err[-3000:]
    assert "resumed from" in out
    expected = read_metrics(uninterrupted)
    assert_curves_match(expected, read_metrics(tmp_path), rtol=0, keys=("loss", "grad_norm"))


def test_kill_during_save_keeps_the_previous_commit(tmp_path):
    args = [*COMMON, "training.steps=400", "checkpoint.interval=3", "checkpoint.keep=2", "logging.sequence_ids=false",
            f"run.dir={tmp_path}"]
    agent = _torchrun_popen(2, args)
    folder = tmp_path / "checkpoints"
    try:
        wait_for(lambda: (folder / "step-3" / "COMMITTED").is_file(), 180)
        wait_for(lambda: (folder / ".tmp-step-6").exists(), 180)  # the next save has started
        for pid in child_pids(agent):
            os.kill(pid, signal.SIGKILL)
        agent.communicate(timeout=120)
    finally:
        agent.kill()
    committed = sorted(p.name for p in folder.glob("step-*") if (p / "COMMITTED").is_file())
    assert "step-3" in committed
    proc = run_torchrun(2, "recipes.pretrain", [*args[:-2], "training.steps=8", f"run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    newest = committed[-1]
    assert f"resumed from {folder / newest}" in proc.stdout


def test_hung_peer_ends_the_job_within_the_timeout(tmp_path):
    args = [*COMMON, "training.steps=100000", "checkpoint.enabled=false", "logging.sequence_ids=false",
            "parallel.timeout_s=8", f"run.dir={tmp_path}"]
    agent = _torchrun_popen(2, args)
    try:
        wait_for(lambda: logged_steps(tmp_path) >= 2, 180)
        hung = child_pids(agent)[-1]
        os.kill(hung, signal.SIGSTOP)
        start = time.time()
        wait_for(lambda: "a peer rank died" in agent.err_path.read_text(), 60)
        elapsed = time.time() - start
        # The live rank has stopped; torchrun's SIGTERM reaches the stopped one when it runs again (else
        # torchrun waits 30 s before its SIGKILL).
        wait_for(lambda: f"Sending process {hung} closing signal" in agent.err_path.read_text(), 60)
        os.kill(hung, signal.SIGCONT)
        out, err = agent.communicate(timeout=120)
    finally:
        agent.kill()
        subprocess.run(["kill", "-9", str(hung)], capture_output=True)
    assert agent.returncode != 0
    assert elapsed < 60, elapsed
    assert "a peer rank died or stopped responding" in err
    assert re.search(r"exitcode\s*:\s*3\b", err), err[-2000:]


def test_async_save_commits_checkpoints_that_resume_exactly(uninterrupted, tmp_path):
    args = [*COMMON, "checkpoint.async_save=true", "checkpoint.interval=2", "checkpoint.keep=2",
            "logging.sequence_ids=false"]
    proc = run_torchrun(4, "recipes.pretrain", [*args, f"run.dir={tmp_path / 'a'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "a" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-6", "step-8"]  # keep=2, nothing left half-written
    for step_dir in folder.iterdir():
        assert (step_dir / "COMMITTED").is_file() and (step_dir / "manifest.json").is_file()
        CheckpointManager.verify(step_dir)  # the checksums taken while writing in the background hold
    assert_curves_match(read_metrics(uninterrupted), read_metrics(tmp_path / "a"), rtol=0, keys=("loss", "grad_norm"))
    proc = run_torchrun(2, "recipes.pretrain", [*args, "training.steps=10", f"checkpoint.resume={folder / 'step-6'}",
                                                f"run.dir={tmp_path / 'b'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = {r["step"]: r for r in read_metrics(tmp_path / "b")}
    expected = {r["step"]: r for r in read_metrics(uninterrupted)}
    for step in (7, 8):
        assert abs(resumed[step]["loss"] - expected[step]["loss"]) <= 1e-4 * expected[step]["loss"]
