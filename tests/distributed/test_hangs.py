"""Hangs: a rank that stops answering (`debug.hang_rank`) ends the job with exit 3 within the
collective timeout, and both ranks leave `<run.dir>/hang/rank-<N>.txt` with every thread's stack and
their last collectives; the watchdog's overdue test on a fake clock; the flight recorder in one
process. (That a SIGTERM preemption leaves no hang file is checked by test_checkpoint's SIGTERM test.)"""

from __future__ import annotations

import re
import signal
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from parallel import flight_recorder
from tests.helpers import FAST, run_recipe, run_torchrun
from titan.watchdog import HangWatchdog

ARGS = [*FAST, "training.steps=20", "eval.interval=0", "checkpoint.enabled=false", "logging.log_interval=1"]


def test_hung_rank_ends_the_job_with_exit_3_and_every_rank_dumps_its_stacks(tmp_path):
    start = time.time()
    proc = run_torchrun(2, "recipes.pretrain", [*ARGS, "parallel.timeout_s=10", "training.health.hang_factor=10",
                                                "debug.hang_rank=1", "debug.hang_step=3", f"run.dir={tmp_path}"],
                        timeout=90)
    elapsed = time.time() - start
    err = proc.stderr
    assert proc.returncode == 1, err[-3000:]  # torchrun's own code; the live rank's is 3
    assert re.search(r"rank\s*:\s*0 .*\n\s*exitcode\s*:\s*3\b", err), err[-3000:]
    assert elapsed < 60, elapsed
    hang = tmp_path / "hang"
    error = next(line for line in err.splitlines() if line.startswith("error: a peer rank died or stopped responding"))
    assert f"{hang / 'rank-0.txt'}" in error
    live, hung = (hang / "rank-0.txt").read_text(), (hang / "rank-1.txt").read_text()
    for text in (live, hung):
        assert "--- thread MainThread" in text and "--- thread hang-watchdog (daemon)" in text
        assert "step 3 has run" in text  # the watchdog saw the step overrun before the timeout
    assert "injected_hang_sleeps_forever" in hung and "time.sleep(3600)" in hung
    assert "SIGTERM received while step 3 was overdue" in hung  # torchrun's SIGTERM ended it at once
    assert "a collective failed: a peer rank died or stopped responding" in live
    assert re.search(r"Timed out|Application timeout", live), live[:4000]
    # The live rank's last collectives name their mesh dimension; the one it waited in never returned
    # (FSDP's all-gathers are asynchronous on gloo: issued ahead, never completed).
    collectives = [line for line in live.split("last ")[1].splitlines() if line.startswith("  #")]
    assert any("step 2" in line and "reduce_scatter_single" in line and "dp_shard (ranks [0, 1])" in line
               for line in collectives)
    assert re.search(r"step 3 +all_gather_single +dp_shard \(ranks \[0, 1\]\) +float32\[\d+\].*"
                     r"(DID NOT RETURN|issued \(async\), NOT COMPLETED)", live), live[:4000]


def test_hang_rank_outside_the_job_is_refused(tmp_path):
    proc = run_recipe("recipes.pretrain", [*ARGS, "debug.hang_rank=1", f"run.dir={tmp_path}"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "debug.hang_rank" in proc.stderr and "does not exist in a job of 1 ranks" in proc.stderr


# ---------------------------------------------------------------------------------------------- no processes

@pytest.fixture
def dump_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(flight_recorder, "_dump_dir", None)
    monkeypatch.delenv("RANK", raising=False)
    flight_recorder.set_dump_dir(tmp_path)
    return tmp_path / "hang"


def test_watchdog_flags_a_step_only_past_hang_factor_times_the_median(dump_dir):
    now = [0.0]
    watchdog = HangWatchdog(10.0, rank=0, min_seconds=1.0, clock=lambda: now[0], watch=False)

    def step(number: int, seconds: float) -> None:
        watchdog.begin(number)
        now[0] += seconds
        watchdog.end(number)

    watchdog.begin(1)  # the first step of the process (warm-up) is never judged, nor counted
    now[0] += 500.0
    assert watchdog.overdue(now[0]) is None and not watchdog.check()
    watchdog.end(1)
    for number, seconds in ((2, 0.2), (3, 0.3), (4, 0.2)):  # median 0.2 s: a step may run 2 s
        step(number, seconds)
    assert watchdog.threshold() == pytest.approx(2.0)
    watchdog.begin(5)
    now[0] += 1.9
    assert watchdog.overdue(now[0]) is None and not watchdog.check()
    watchdog._heard(bytes([signal.SIGTERM]))  # a preemption during a step on time: nothing written
    assert not watchdog.check() and not dump_dir.exists()
    now[0] += 0.2
    assert watchdog.overdue(now[0]) == (5, pytest.approx(2.1), pytest.approx(2.0))
    assert watchdog.check() and watchdog.check()
    text = (dump_dir / "rank-0.txt").read_text()
    assert text.count("=====") == 1 and "step 5 has run 2.1 s, over 2.0 s" in text and "--- thread MainThread" in text
    now[0] += 1.0
    watchdog.end(5)
    assert "step 5 ended after 3.1 s: it was slow, not hung" in (dump_dir / "rank-0.txt").read_text()
    watchdog.close()
    # Tiny steps: never overdue below min_seconds.
    for number in range(6, 40):
        step(number, 0.001)
    watchdog.begin(40)
    now[0] += 0.9
    assert watchdog.overdue(now[0]) is None
    now[0] += 0.2
    assert watchdog.overdue(now[0])[0] == 40
    # Off: never overdue.
    off = HangWatchdog(0.0, rank=0, clock=lambda: now[0], watch=False)
    for number in range(1, 5):
        off.begin(number)
        now[0] += 0.1
        off.end(number)
    off.begin(5)
    now[0] += 1e6
    assert off.threshold() is None and not off.check()


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=timedelta(seconds=30))
    flight_recorder.install()
    flight_recorder.clear()
    try:
        yield dist.group.WORLD
    finally:
        flight_recorder.uninstall()
        flight_recorder.clear()
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # all_gather_into_tensor is deprecated
def test_flight_recorder_records_each_collective_once_with_its_group_sizes_and_step(one_rank_group, dump_dir):
    flight_recorder.name_groups({one_rank_group.group_name: "dp_shard"})
    flight_recorder.set_step(7, True)
    x = torch.ones(4, 3)
    dist.all_reduce(x)
    out = torch.empty(4, 3)
    dist.all_gather_into_tensor(out, x)  # deprecated: calls all_gather_single, recorded once
    funcol.all_reduce(x, "sum", one_rank_group).wait()
    flight_recorder.set_step(7, False)
    dist.barrier()
    entries = flight_recorder.recorded()
    assert [e[flight_recorder.NAME] for e in entries] == ["all_reduce", "all_gather_into_tensor", "funcol.all_reduce",
                                                          "barrier"]
    assert [e[flight_recorder.WHERE] for e in entries] == [(7, True)] * 3 + [(7, False)]
    assert all(e[flight_recorder.RETURNED] for e in entries)
    lines = flight_recorder.format_collectives()
    assert "step 7" in lines[0] and "dp_shard (ranks [0])" in lines[0] and "float32[4, 3]" in lines[0]
    assert "issued (async)" in lines[2] and "after step 7" in lines[3]
    assert dist.all_reduce.__recorded__ is not None  # wrapped where FSDP and our code look it up
    path = flight_recorder.write_dump("test", ["a detail"])
    assert path == dump_dir / "rank-0.txt" and "a detail" in path.read_text() and "funcol.all_reduce" in path.read_text()
