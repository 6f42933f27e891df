"""The run folder lock, the resume rules for changed settings and the finite-state guard."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from parallel.tensors import all_finite
from titan.checkpoint.resume import check_resumable, config_changes
from titan.config import ConfigError
from titan.data.sampler import GlobalCursorSampler
from titan.metrics import read_jsonl, truncate_after_step
from titan.run_dir import LOCK_FILE, RunDirLock

HOLD = "import sys, time; from pathlib import Path; from titan.run_dir import RunDirLock; " \
       "lock = RunDirLock(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)"


def test_lock_refuses_a_second_holder_naming_it_and_is_released_when_the_holder_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError) as info:
            RunDirLock(tmp_path)
        assert info.value.key == "run.dir" and f"pid {holder.pid}" in str(info.value)
        assert socket.gethostname() in str(info.value) and "own run.dir" in str(info.value)
    finally:
        holder.kill()
        holder.wait()
    lock = RunDirLock(tmp_path)  # the dead process's lock went with it
    assert f"pid {os.getpid()}" in (tmp_path / LOCK_FILE).read_text()
    lock.release()


def test_lock_on_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch):
    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    warnings: list[str] = []
    RunDirLock(tmp_path, warn=warnings.append).release()
    assert len(warnings) == 1 and "does not support locks" in warnings[0]


SAVED = {"model": {"dim": 64, "n_layers": 2}, "optim": {"lr": 0.003, "name": "adamw"}, "training": {"seq_len": 64, "seed": 1},
         "data": {"tokenizer": "byte", "source": "pydoc"}, "run": {"dir": "/a"}}


def changed(**updates) -> dict:
    now = json.loads(json.dumps(SAVED))
    for dotted, value in updates.items():
        section, key = dotted.split("__")
        now[section][key] = value
    return now


def test_resume_lists_changes_and_refuses_only_fixed_keys(tmp_path):
    now = changed(optim__lr=0.001, run__dir="/b")
    assert config_changes(SAVED, now) == [("optim.lr", 0.003, 0.001), ("run.dir", "/a", "/b")]
    check_resumable(SAVED, now, tmp_path)
    for key, value in [("model.dim", 128), ("training.seq_len", 128), ("data.tokenizer", "tok.json"),
                       ("optim.name", "muon")]:
        with pytest.raises(ConfigError) as info:
            check_resumable(SAVED, changed(**{key.replace(".", "__"): value}), tmp_path)
        assert info.value.key == key and repr(value) in str(info.value)
    with pytest.raises(ConfigError, match="checkpoint.new_data_seed=true"):
        check_resumable(SAVED, changed(training__seed=2), tmp_path)
    check_resumable(SAVED, changed(training__seed=2), tmp_path, new_data_seed=True)


def test_sampler_takes_a_new_seed_only_when_asked():
    old = GlobalCursorSampler(100, 8, 4, 0, 1, seed=1)
    old.consumed = 16
    with pytest.raises(ValueError):
        GlobalCursorSampler(100, 8, 4, 0, 1, seed=2).load_state_dict(old.state_dict())
    new = GlobalCursorSampler(100, 8, 4, 0, 1, seed=2, new_seed=True)
    new.load_state_dict(old.state_dict())
    assert new.consumed == 16 and new.step_indices(16) != old.step_indices(16)


def test_all_finite_sees_nan_and_inf():
    assert all_finite([torch.ones(3), torch.tensor([1, 2])], torch.device("cpu"))
    assert not all_finite([torch.ones(3), torch.tensor([0.0, float("inf")])], torch.device("cpu"))
    assert not all_finite([torch.tensor([float("nan")])], torch.device("cpu"))


def test_torn_last_line_is_dropped_and_rows_past_the_checkpoint_removed(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    warnings: list[str] = []
    assert [r["step"] for r in read_jsonl(path, warnings.append)] == [1, 2]
    assert f"{path}:3" in warnings[0]
    truncate_after_step(path, 1, warnings.append)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n'
