"""`profile.steps=[a,b]`: one Chrome/Perfetto trace per rank under `<run.dir>/profile/`; off (and
idle) by default; a bad window is refused naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import FAST, run_recipe, run_torchrun
from titan.config import ConfigError
from titan.profiling import StepProfiler, check_profile

ARGS = [*FAST, "training.steps=4", "eval.interval=0", "checkpoint.enabled=false"]


def trace_events(path: Path) -> list[dict]:
    trace = json.loads(path.read_text())
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def test_one_process_writes_a_trace_of_the_chosen_steps(tmp_path):
    proc = run_recipe("recipes.pretrain", [*ARGS, "profile.steps=[2,3]", f"run.dir={tmp_path}"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in (tmp_path / "profile").iterdir()] == ["rank-0-steps-2-3.json"]
    events = trace_events(tmp_path / "profile" / "rank-0-steps-2-3.json")
    assert len(events) > 100 and any("aten::" in e.get("name", "") for e in events)
    assert "profile: steps 2-3 traced" in proc.stdout


def test_each_rank_writes_its_trace(tmp_path):
    proc = run_torchrun(2, "recipes.pretrain", [*ARGS, "profile.steps=[2,3]", f"run.dir={tmp_path}"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "profile").iterdir())
    assert names == ["rank-0-steps-2-3.json", "rank-1-steps-2-3.json"]
    for name in names:
        events = trace_events(tmp_path / "profile" / name)
        assert any("all_gather" in e.get("name", "") or "allgather" in e.get("name", "") for e in events), name


def test_bad_profile_window_is_refused_naming_the_key(tmp_path):
    proc = run_recipe("recipes.pretrain", [*ARGS, "profile.steps=[3,2]", f"run.dir={tmp_path}"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config error at `profile.steps`" in proc.stderr and "training.steps=4" in proc.stderr
    assert not (tmp_path / "profile").exists()


@pytest.mark.parametrize("steps", [[2, 5], [2], [0, 1], [1, 2, 3]])
def test_check_profile_refuses_windows_outside_the_run(steps):
    with pytest.raises(ConfigError, match="profile.steps"):
        check_profile(steps, 4)


def test_profiler_off_by_default_does_nothing(tmp_path):
    check_profile([], 4)
    profiler = StepProfiler([], tmp_path, 0, torch.device("cpu"))
    for step in range(1, 5):
        profiler.begin(step)
        assert profiler.profiler is None
        profiler.end(step)
    assert not (tmp_path / "profile").exists()
