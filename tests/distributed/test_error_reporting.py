"""Under torchrun the error that ends a run reaches the user whichever rank detects it, once; Ctrl-C on
the launcher saves on every rank and stops without a traceback."""

from __future__ import annotations

import signal
import sys
import time

from tests.helpers import FAST, Launched, logged_steps, read_metrics, run_torchrun, wait_for
from titan.checkpoint import CheckpointManager

WORKER = '''
import os, sys, time
from recipes.cli import fail

rank = int(os.environ["RANK"])
if sys.argv[1] == "one":  # only rank 1 sees the problem; rank 0 is busy and is stopped by torchrun
    if rank == 1:
        fail("config error at `one`: only rank 1 saw it. Fix: nothing.")
    time.sleep(60)
else:  # every rank sees it, rank 0 last
    time.sleep(1.0 if rank == 0 else 0.0)
    fail("config error at `all`: every rank saw it. Fix: nothing.")
'''


def test_error_seen_by_one_rank_is_printed_and_one_seen_by_all_is_printed_once(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    began = time.time()
    one = run_torchrun(3, None, ["one"], script=str(script), timeout=120)
    assert time.time() - began < 50 and one.returncode != 0
    assert "error: config error at `one`: only rank 1 saw it." in one.stderr, one.stderr[-2000:]
    every = run_torchrun(3, None, ["all"], script=str(script), timeout=120)
    assert every.returncode != 0 and "exitcode  : 2" in every.stderr
    assert every.stderr.count("error: config error at `all`") == 1, every.stderr[-3000:]


def test_ctrl_c_on_the_launcher_saves_on_every_rank_and_exits_130(tmp_path):
    run_dir = tmp_path / "run"
    launcher = Launched([sys.executable, "-m", "launch", "--nproc-per-node", "2", "--run-dir", str(run_dir),
                         *FAST, "eval.interval=0", "logging.log_interval=1", "training.steps=100000"],
                        tmp_path / "logs")
    try:
        wait_for(lambda: logged_steps(run_dir) >= 3, 120)
        launcher.proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends the launcher
        out, err = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "launch: stopped by SIGINT" in err
    assert "stopped (Ctrl-C): checkpoint of step" in out
    saved = CheckpointManager(run_dir, 2, False).latest()
    CheckpointManager.verify(saved)
    assert int(saved.name.split("-")[1]) == read_metrics(run_dir)[-1]["step"]
