"""A checkpoint that does not fit, or whose storage fails, ends the run with one paragraph and exit code 4.

End to end, `run.dir` is a small tmpfs (root only) where the first checkpoint fits and the second does
not: sync, async and a 2-rank torchrun run. In process, faults are injected into a shard write or the
commit. Under torchrun this file is also the worker (`__main__`) whose two ranks must raise the same
error at the same step. Each checks: the error's type and message (folder, bytes, fix), the previous
commit intact and still kept, and no unfinished folder left.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from tests.helpers import FAST, REPO_ROOT, read_metrics, run_recipe, run_torchrun
from titan.checkpoint import CheckpointManager, CheckpointSpaceError, CheckpointWriteError, low_space_warning
from titan.checkpoint.manifest import ChecksumWriter

ARGS = [*FAST, "eval.interval=0", "logging.log_interval=1", "training.steps=6", "checkpoint.interval=2"]
DISK = "3m"  # the debug model's checkpoint (model, AdamW state) is about 2.2 MB: one fits, two do not
STORAGE_EXIT = 4  # the documented exit code of a checkpoint that could not be written
REPO_FRAME = f'File "{re.escape(str(REPO_ROOT))}/(?!\\.venv/)'  # a traceback line through this repository's code (not its venv)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 3 MB tmpfs, unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield folder
    if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def assert_space_error(message: str, folder: Path, step: int, previous: int) -> tuple[int, int]:
    """One paragraph naming the folder, the bytes needed and free, the fix and the intact previous commit;
    returns (needed, free)."""
    assert "\n" not in message
    assert f"checkpoint of step {step} did not fit in {folder}" in message, message
    needed = re.search(r"needs about ([\d,]+) bytes", message)
    free = re.search(r"and ([\d,]+) bytes \([\d.]+ MiB\) are free", message)
    assert needed and free, message
    assert "No space left on device" in message
    assert f"step-{previous} is intact" in message and "the same command resumes" in message
    assert "checkpoint.keep" in message and "run.dir" in message and "Fix: free " in message
    return int(needed.group(1).replace(",", "")), int(free.group(1).replace(",", ""))


def assert_left_as_before(folder: Path, previous: int) -> None:
    """The previous commit intact and kept, nothing unfinished left."""
    assert [p.name for p in CheckpointManager(folder.parent, 1, False).committed()] == [f"step-{previous}"]
    CheckpointManager.verify(folder / f"step-{previous}")
    assert not list(folder.glob(".tmp-step-*"))


@pytest.mark.parametrize("async_save", [False, True])
def test_full_disk_ends_the_run_with_one_paragraph_and_exit_4(small_disk, async_save):
    run_dir = small_disk / "run"
    args = [*ARGS, f"checkpoint.async_save={async_save}", f"run.dir={run_dir}"]
    proc = run_recipe("recipes.pretrain", args, timeout=120)
    assert proc.returncode == STORAGE_EXIT, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    needed, free = assert_space_error(error_line(proc.stderr), run_dir / "checkpoints", step=4, previous=2)
    assert 2 << 20 < needed < 3 << 20 and free < needed and f"free at least {needed - free:,} bytes" in proc.stderr
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("warning: only")]
    assert len(warnings) == 1 and "step-2" in warnings[0], proc.stdout[-2000:]
    assert_left_as_before(run_dir / "checkpoints", previous=2)
    steps = [row["step"] for row in read_metrics(run_dir)]
    assert steps[:4] == [1, 2, 3, 4] and len(steps) <= 6
    if not async_save:
        # Space freed (the disk grown): the same command resumes from step 2 and finishes.
        subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
        again = run_recipe("recipes.pretrain", args, timeout=120)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "resumed from" in again.stdout and "step-2" in again.stdout
        assert [row["step"] for row in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]


def test_full_disk_under_torchrun_stops_both_ranks_with_exit_4(small_disk):
    run_dir = small_disk / "run"
    proc = run_torchrun(2, "recipes.pretrain", [*ARGS, "checkpoint.async_save=true", f"run.dir={run_dir}"],
                        timeout=120)
    assert proc.returncode != 0
    assert len(re.findall(rf"exitcode\s*: {STORAGE_EXIT} ", proc.stderr)) == 2, proc.stderr[-3000:]
    assert not re.search(REPO_FRAME, proc.stderr) and "inline_container" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("Traceback") <= 1  # torchrun's own ChildFailedError, if any
    needed, free = assert_space_error(error_line(proc.stderr), run_dir / "checkpoints", step=4, previous=2)
    assert 2 << 20 < needed < 3 << 20 and free < needed and f"free at least {needed - free:,} bytes" in proc.stderr
    assert_left_as_before(run_dir / "checkpoints", previous=2)
    read_metrics(run_dir)


# In process: faults injected into one write.

class FillingFile:
    """A file on a disk that fills up after `room` bytes."""

    def __init__(self, raw: Any, room: int = 1024):
        self.raw, self.room = raw, room

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        if size > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= size
        return self.raw.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


@contextmanager
def fault(where: str, code: int = errno.ENOSPC) -> Iterator[None]:
    """Shard writes that run out of room (`shard`), or the commit's manifest failing with `code` (`commit`)."""
    if where == "shard":
        target = mock.patch("titan.checkpoint.storage.ChecksumWriter", lambda raw: ChecksumWriter(FillingFile(raw)))
    else:
        target = mock.patch("titan.checkpoint.manager.write_manifest",
                            side_effect=OSError(code, os.strerror(code), "manifest.json"))
    with target:
        yield


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(4)])
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 32)).sum().backward()
    optimizer.step()
    return model, optimizer


def failed_save(manager: CheckpointManager, where: str, active: bool, code: int = errno.ENOSPC) -> dict:
    """Save step 1, then step 2 with the fault (on this rank when `active`), stepping on (a barrier and a
    poll() per step) until it raises; the error and the step it was raised at."""
    model, optimizer = build()
    manager.save(1, model, optimizer, {"step": 1})
    manager.wait()
    step = 2
    try:
        with fault(where, code) if active else nullcontext():
            manager.save(2, model, optimizer, {"step": 2})
            for step in range(3, 200):
                if dist.is_initialized():
                    dist.barrier()  # a training step's collective
                manager.poll()
            manager.wait()
    except Exception as exc:
        return {"error": type(exc).__name__, "message": str(exc), "step": step}
    finally:
        manager.close()
    return {"error": None}


@pytest.mark.parametrize("async_save", [False, True])
@pytest.mark.parametrize("where", ["shard", "commit"])
def test_out_of_space_in_a_shard_or_the_commit_raises_one_error(tmp_path, where, async_save):
    manager = CheckpointManager(tmp_path, keep=1, is_writer=True, async_save=async_save, log=lambda line: None)
    outcome = failed_save(manager, where, active=True)
    assert outcome["error"] == CheckpointSpaceError.__name__, outcome
    assert_space_error(outcome["message"], tmp_path / "checkpoints", step=2, previous=1)
    assert outcome["step"] >= 3 if async_save else outcome["step"] == 2  # async: from a later poll()
    assert_left_as_before(tmp_path / "checkpoints", previous=1)  # keep=1, yet step-1 was not pruned


@pytest.mark.parametrize("code", [errno.EIO, errno.EROFS])
def test_other_storage_errors_name_the_folder_and_the_os_error(tmp_path, code):
    manager = CheckpointManager(tmp_path, keep=1, is_writer=True, log=lambda line: None)
    outcome = failed_save(manager, "commit", active=True, code=code)
    assert outcome["error"] == CheckpointWriteError.__name__, outcome
    message = outcome["message"]
    assert f"could not be written to {tmp_path / 'checkpoints'}" in message and os.strerror(code) in message
    assert "step-1 is intact" in message and "run.dir" in message and "\n" not in message
    assert_left_as_before(tmp_path / "checkpoints", previous=1)


def test_a_save_warns_once_when_less_is_free_than_the_last_checkpoint_takes(tmp_path, monkeypatch):
    lines: list[str] = []
    manager = CheckpointManager(tmp_path, keep=2, is_writer=True, log=lines.append)
    model, optimizer = build()
    assert low_space_warning(tmp_path) is None  # nothing committed yet
    manager.save(1, model, optimizer, {"step": 1})
    assert low_space_warning(tmp_path) is None and lines == []
    monkeypatch.setattr("shutil.disk_usage", lambda path: SimpleNamespace(free=1000))
    manager.save(2, model, optimizer, {"step": 2})
    manager.close()
    assert len(lines) == 1 and "\n" not in lines[0] and "1,000 bytes" in lines[0] and "step-1" in lines[0], lines
    assert "step-2" in low_space_warning(tmp_path)  # the function the recipe may call, now about the newest


def test_two_ranks_raise_the_same_error_at_the_same_step(tmp_path):
    proc = run_torchrun(2, None, [str(tmp_path)], timeout=120, script=__file__)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # same error, same message, same step on both ranks
    for case, outcome in ranks[0].items():
        assert outcome["error"] == CheckpointSpaceError.__name__, (case, outcome)
        assert_space_error(outcome["message"], tmp_path / case / "checkpoints", step=2, previous=1)
        assert_left_as_before(tmp_path / case / "checkpoints", previous=1)


def worker(out: Path) -> None:
    """Each rank, per case: rank 1's shard write or the writer's commit runs out of space, sync and async."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for async_save in (False, True):
        for where, failing_rank in (("shard", 1), ("commit", 0)):
            case = f"{where}-{'async' if async_save else 'sync'}"
            manager = CheckpointManager(out / case, keep=1, is_writer=rank == 0, async_save=async_save,
                                        log=lambda line: None)
            results[case] = failed_save(manager, where, active=rank == failing_rank)
    (out / f"rank-{rank}.json").write_text(json.dumps(results, sort_keys=True))
    dist.destroy_process_group()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
