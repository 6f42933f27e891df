"""`python -m recipes.report <run.dir>`: the summary and the plots of a real finished run (2 ranks,
with a skipped step and a slowed rank), of a crashed and a running run, the pipeline picture of a
pp layout, and the refusal of a folder that is no run."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
from matplotlib.image import imread
from omegaconf import OmegaConf

from parallel.pipeline import schedule_actions
from recipes.report import main
from tests.helpers import FAST, read_metrics, run_recipe, run_torchrun
from titan.report import read_run, replay, status
from titan.run_dir import RunDirLock

RUN = [*FAST, "training.steps=5", "logging.log_interval=1", "eval.interval=2", "eval.steps=1",
       "checkpoint.interval=2", "debug.slow_rank=1", "debug.nan_steps=[3]"]
PLOTS = ("loss.png", "lr.png", "grad_norm.png", "throughput.png", "step_time.png", "comm.png")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A real 2-rank run: FSDP traffic, per-rank times, a skipped step (3), checkpoints."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    proc = run_torchrun(2, "recipes.pretrain", [*RUN, f"run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    height, width = imread(path).shape[:2]
    assert height > 100 and width > 100, path


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_finished_run(finished, tmp_path):
    out = tmp_path / "plots"
    proc = run_recipe("recipes.report", [str(finished), f"out={out}"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows, text = read_metrics(finished), proc.stdout
    assert text.splitlines()[0] == f"run {finished} (debug-pydoc): finished"
    assert f"steps: 5 of 5, {rows[-1]['tokens']:,} tokens, 2 ranks" in text
    speed, mfu = statistics.mean(r["tokens_per_s"] for r in rows), statistics.mean(r["mfu"] for r in rows)
    assert f"throughput: {speed:,.0f} tokens/s, MFU {mfu:.1%} (mean of the last 5 logged steps)" in text
    losses = [(r["loss"], r["step"]) for r in rows if r["loss"] is not None]
    assert f"loss: last {rows[-1]['loss']:.4f} (step 5), best {min(losses)[0]:.4f} (step {min(losses)[1]})" in text
    evals = [(r["eval_loss"], r["step"]) for r in rows if "eval_loss" in r]
    assert f"eval loss: last {evals[-1][0]:.4f} (step {evals[-1][1]}), best {min(evals)[0]:.4f}" in text
    assert f"skipped steps: 1 (step 3: {rows[2]['skip_reason']})" in text
    named = [e for e in events(finished) if e["event"] == "straggler"]
    assert ("stragglers: rank 1 on" in text) if named else ("stragglers: none named" in text)
    kept = sorted(int(p.parent.name.split("-")[1]) for p in (finished / "checkpoints").glob("step-*/COMMITTED"))
    assert f"checkpoints: {len(kept)} committed (steps {', '.join(map(str, kept))})" in text
    assert "resumes: none" in text and "rollbacks: none" in text
    assert f"dp_shard {rows[-1]['comm_gb/dp_shard'] * 1e3:.2f} MB" in text
    for name in PLOTS:
        assert f"wrote {out / name}" in text
        assert_png(out / name)
    assert "skipped pipeline.png: the run has no pipeline (parallel.pp = 1)" in text


def test_crashed_run(finished, tmp_path, capsys):
    """Metrics cut mid-line at step 3, no final event, the lock free: a crash."""
    run_dir = tmp_path / "crashed"
    shutil.copytree(finished, run_dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])
    (run_dir / "events.jsonl").write_text(json.dumps(events(finished)[0]) + "\n")
    main([str(run_dir)])
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0].endswith(": crashed")
    assert f"steps: 3 of 5, {json.loads(lines[2])['tokens']:,} tokens" in captured.out
    assert "metrics.jsonl:4 is not a complete JSON record" in captured.err
    for name in PLOTS:
        assert_png(run_dir / "report" / name)
    lock = RunDirLock(run_dir)  # a process holds the lock: the run is running
    try:
        assert status(read_run(run_dir)) == "running"
    finally:
        lock.release()


def test_rollbacks_resumes_and_a_pipeline(finished, tmp_path, capsys):
    """Fixture files: a rollback, a resume, and a pipeline layout (pp 2, interleaved 1F1B, v 2)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = OmegaConf.load(finished / "config.yaml")
    cfg.parallel.update(pp=2, pp_schedule="interleaved_1f1b", pp_virtual_stages=2)
    cfg.model.n_layers = 4
    OmegaConf.save(cfg, run_dir / "config.yaml")
    rows = [{"step": s, "loss": 6.0, "lr": 1e-3, "grad_norm": 1.0 if s != 4 else None, "tokens": 512 * s,
             "tokens_per_s": 100.0, "mfu": 0.01, "skipped_steps": int(s >= 4)} for s in range(1, 7)]
    rows[3].update(skipped=True, skip_reason="the loss is nan")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "skipped_data.jsonl").write_text(json.dumps(
        {"step": 7, "rolled_back_to": 4, "ranges": [[32, 56]], "reason": "3 bad steps in a row"}) + "\n")
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in [
        {"time": 1.0, "event": "start", "step": 0, "world_size": 2},
        {"time": 2.0, "event": "stopped", "step": 3},
        {"time": 3.0, "event": "resume", "step": 2, "from": "ckpt/step-2", "world_size": 2}]))
    main([str(run_dir)])
    text = capsys.readouterr().out
    assert text.splitlines()[0].endswith(": crashed")
    assert "rollbacks: 1: at step 7 back to step 4, positions 32..55 never drawn again (3 bad steps in a row)" in text
    assert "resumes: 1: at step 2 from ckpt/step-2" in text
    assert "skipped step_time.png: no ranks.jsonl" in text and "skipped comm.png: no comm_gb" in text
    for name in ("grad_norm.png", "pipeline.png"):
        assert_png(run_dir / "report" / name)


@pytest.mark.parametrize("schedule,pp,v,m", [("gpipe", 4, 1, 8), ("1f1b", 4, 1, 8), ("interleaved_1f1b", 4, 2, 8)])
def test_pipeline_replay_has_the_closed_form_bubble(schedule, pp, v, m):
    timed = replay(schedule_actions(schedule, pp, v, m), pp * v)
    end, ideal = max(a[4] for rank in timed for a in rank), m * v * 3.0  # F = 1, B = 2 per stage
    assert (end - ideal) / ideal == pytest.approx((pp - 1) / (v * m))


@pytest.mark.parametrize("make", [lambda d: None, lambda d: d.mkdir()])
def test_a_folder_that_is_no_run_exits_2(tmp_path, capsys, make):
    make(tmp_path / "nothing")
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "nothing")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Fix: pass the run.dir" in err and len(err.strip().splitlines()) == 1
