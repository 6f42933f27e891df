"""The health policy through real torchrun runs with injected faults (`debug.*`): a NaN step is
skipped on every rank and the run goes on exactly as a run whose data skipped that batch; a run of
spikes rolls back to the newest checkpoint past the data window, which no later resume (on another
layout) trains on; a slow rank is named as the straggler, a balanced run names none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import assert_curves_match, read_metrics, run_recipe, run_torchrun
from titan.config import DataConfig
from titan.data.loader import load_data
from titan.data.sampler import GlobalCursorSampler

COMMON = ["model=debug", "training.seq_len=64", "training.global_batch_size=8", "training.micro_batch_size=2",
          "training.num_threads=1", "logging.log_interval=1", "eval.interval=0", "logging.progress_bar=false",
          "checkpoint.enabled=false"]


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory) -> tuple[Path, str]:
    """2 ranks, a NaN loss (and gradients) injected at step 3 of 7."""
    run_dir = tmp_path_factory.mktemp("nan") / "run"
    proc = run_torchrun(2, "recipes.pretrain", [*COMMON, "training.steps=7", "debug.nan_steps=[3]", f"run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc.stdout


def test_nan_step_is_skipped_and_the_run_goes_on_as_if_its_batch_was_skipped(nan_run, tmp_path):
    run_dir, _ = nan_run
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert rows[2]["skipped"] and "loss is nan" in rows[2]["skip_reason"] and rows[2]["skipped_steps"] == 1
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1, 1]
    # One process whose data skips step 3's batch (global positions 16..23) trains on what the 2 ranks
    # trained on after the skipped step, with the same learning rates.
    reference = tmp_path / "reference"
    proc = run_recipe("recipes.pretrain", [*COMMON, "training.steps=6", "data.skip_ranges=[[16,24]]",
                                           f"run.dir={reference}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = read_metrics(reference)
    assert_curves_match(expected[:2], rows[:2], keys=("loss", "grad_norm", "lr"))
    after = [{**r, "step": r["step"] - 1} for r in rows[3:]]
    assert_curves_match(expected[2:], after, keys=("loss", "grad_norm", "lr"))


def test_balanced_run_names_no_straggler(nan_run):
    run_dir, stdout = nan_run
    assert "straggler" not in stdout
    assert not any(e["event"] == "straggler" for e in events(run_dir))
    ranks = [json.loads(line) for line in (run_dir / "ranks.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ranks] == list(range(1, 8)) and all(len(r["compute_s"]) == 2 for r in ranks)


def test_slow_rank_is_named_as_the_straggler(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_torchrun(2, "recipes.pretrain", [*COMMON, "training.steps=5", "debug.slow_rank=1", "debug.slow_factor=3",
                                                f"run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (warning,) = [line for line in proc.stdout.splitlines() if "straggler" in line]
    assert "rank 1 on" in warning and "3 logged steps in a row (step 3)" in warning
    (event,) = [e for e in events(run_dir) if e["event"] == "straggler"]
    assert event["rank"] == 1 and event["step"] == 3 and event["factor"] > 2
    rows = read_metrics(run_dir)
    assert all(r["slowest_rank"] == 1 and r["step_time_max"] > 2 * r["step_time_min"] for r in rows)


def positions_to_ids(first: int, last: int) -> set[int]:
    """The sequence ids the default data order puts at global positions first..last."""
    windows = len(load_data(DataConfig(), 64).train)
    sampler = GlobalCursorSampler(windows, 8, 2, 0, 1, seed=1234)
    return set(sampler.ids_at(range(first, last + 1)))


def test_spikes_roll_back_past_their_data_and_no_resume_trains_on_it(tmp_path):
    # Three steps are a thin window for a standard deviation: natural steps reach 8 sigmas there, the
    # injected spikes (x1000) thousands; 50 sigmas tells them apart.
    args = [*COMMON, "training.steps=8", "checkpoint.enabled=true", "checkpoint.interval=2", "checkpoint.keep=4",
            "training.health.spike_min_steps=3", "training.health.spike_sigmas=50", "logging.sequence_ids=true"]
    full = tmp_path / "full"
    proc = run_torchrun(2, "recipes.pretrain", [*args, "debug.spike_steps=[5,6,7]", f"run.dir={full}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rollback: 3 bad steps in a row up to step 7; back to step-4" in proc.stdout
    (record,) = [json.loads(line) for line in (full / "skipped_data.jsonl").read_text().splitlines()]
    dropped = record.pop("dropped")
    assert record == {"step": 7, "rolled_back_to": 4, "ranges": [[32, 56]], "bad_steps": 3}
    assert [r["step"] for r in dropped] == [5, 6, 7] and all("spiked" in r["skip_reason"] for r in dropped)
    rows = read_metrics(full)
    assert [r["step"] for r in rows] == list(range(1, 9)) and not any(r.get("skipped") for r in rows)
    # Resume step 6 on 4 ranks: the same curve, and the window stays skipped.
    resumed = tmp_path / "resumed"
    proc = run_torchrun(4, "recipes.pretrain", [*args, f"checkpoint.resume={full / 'checkpoints' / 'step-6'}",
                                                f"run.dir={resumed}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_curves_match([r for r in rows if r["step"] > 6], read_metrics(resumed))
    ids: dict[int, list[int]] = {}
    for run_dir in (full, resumed):
        for line in (run_dir / "sequence_ids.jsonl").read_text().splitlines():
            row = json.loads(line)
            assert ids.setdefault(row["step"], row["ids"]) == row["ids"]
    seen = [i for step in range(1, 9) for i in ids[step]]
    assert len(seen) == len(set(seen)) == 64
    assert not set(seen) & positions_to_ids(32, 55)
