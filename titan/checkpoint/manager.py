"""Save, commit and load the full training state with torch.distributed.checkpoint (DCP).

A checkpoint is written into ``checkpoints/.tmp-step-<N>``: each rank writes its shards (DCP, global
parameter names, so any layout can read them) and checksums them as they are written; the writer
rank adds ``train_state.json`` (step, tokens, LR schedule, data cursor, RNG, W&B id, config). Once
every rank has finished, the writer records every file's size and checksum in ``manifest.json``,
drops the ``COMMITTED`` marker and renames the folder to ``step-<N>``. A folder without the marker
is never loaded. Older checkpoints are pruned only after a new commit, on a background thread that
the next save, ``wait()`` or ``close()`` joins. With ``async_save`` the shards are written, and then
committed, on background threads (the commit's collectives on a process group of their own) while
training goes on; ``poll()`` only notices that it has finished. A load checksums the shards while
DCP reads them, and raises after the load when one does not match the manifest. The file I/O itself
(checksums while writing, tensors read in place) is in `titan.checkpoint.storage`.

A save that fails to write (full disk, read-only or failing storage) ends on every rank together: each
phase (folder, shards, commit) gathers the ranks' outcomes, as the commit gathers their records; the
writer removes the unfinished folder and words the error (`titan.checkpoint.space`), and every rank
raises it. Nothing committed is touched and nothing is pruned. With ``async_save`` the ranks also agree
on the ``poll()`` call that raises it, so they stop at the same step (see `PendingSave`).
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from titan.checkpoint.manifest import (
    CorruptCheckpointError,
    check_size,
    file_record,
    fsync_path,
    read_manifest,
    verify_files,
    write_manifest,
)
from titan.checkpoint.space import (
    WriteFailure,
    checkpoint_bytes,
    classify,
    failure_error,
    failure_message,
    low_space_line,
    tensor_bytes,
)
from titan.checkpoint.storage import SHARD_SUFFIX, InPlaceReader, ShardWriter

COMMIT_MARKER = "COMMITTED"
TRAIN_STATE = "train_state.json"
METADATA = ".metadata"
STEP_DIR = re.compile(r"^step-(\d+)$")
SHARD_RANK = re.compile(r"^__(\d+)_")
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


# Before 2.13, async_save closes the stager it is given once that save ends (a second save with it
# fails on its cleared copy tables); from 2.13 a stager passed in stays the caller's to reuse.
STAGER_REUSABLE = torch.__version__ >= (2, 13)


def _stager() -> DefaultStager:
    """Staging to plain CPU memory, synchronously, before the background write."""
    return DefaultStager(StagingOptions(False, False, False, False))


def committed_steps(folder: Path) -> list[Path]:
    """Committed step folders, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name))
             and (p / COMMIT_MARKER).is_file()]
    return [p for _, p in sorted(found)]


def low_space_warning(run_dir: Path) -> str | None:
    """One warning line when run.dir's disk has less free space than its newest committed checkpoint
    takes (a next checkpoint will likely not fit), else None."""
    folder = run_dir / "checkpoints"
    steps = committed_steps(folder)
    return low_space_line(folder, steps[-1] if steps else None)


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world() -> int:
    return dist.get_world_size() if _distributed() else 1


def _all_gather(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _in_background(fn: Callable[..., Any], *args: Any, future: Future | None = None) -> Future:
    """Run `fn(*args)` on a daemon thread; its result, or its exception, lands in `future` (a new one by default)."""
    future = Future() if future is None else future

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # handed to whoever waits on the future
            future.set_exception(exc)

    threading.Thread(target=run, name=f"checkpoint-{fn.__name__}", daemon=True).start()
    return future


def _raise_gathered(problem: tuple[str, str] | None) -> None:
    """Raise on every rank the first corrupt file any rank found (collective)."""
    found = [p for p in _all_gather(problem) if p is not None]
    if found:
        raise CorruptCheckpointError(Path(found[0][0]), found[0][1])


def _problem(check: Callable[[], None]) -> tuple[str, str] | None:
    """(file, problem) when `check` finds a corrupt file, else None."""
    try:
        check()
    except CorruptCheckpointError as exc:
        return str(exc.path), exc.problem
    return None


def _verify_own_shards(path: Path, records: dict[str, dict]) -> tuple[str, str] | None:
    """Checksum this rank's share of the shard files (`__<k>_*`, k % world == rank)."""
    names = [n for n in sorted(records) if (m := SHARD_RANK.match(n)) and int(m.group(1)) % _world() == _rank()]
    return _problem(lambda: verify_files(path, records, names))


def _attempt(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> BaseException | None:
    """Run `fn`; what it raised (DCP's CheckpointException included), or None."""
    try:
        fn(*args, **kwargs)
    except (Exception, CheckpointException) as exc:
        return exc
    return None


def _described(error: BaseException | None) -> WriteFailure | None:
    """This rank's failure, small enough to gather."""
    return classify(error, _rank()) if error is not None else None


def _worst(failures: Iterable[WriteFailure | None]) -> WriteFailure | None:
    """The most telling of the ranks' failures (out of space first), or None when none failed."""
    return min((f for f in failures if f is not None), key=WriteFailure.order, default=None)


@dataclass
class SaveJob:
    """One save: its step, its unfinished folder and what a failure's message needs."""
    step: int
    tmp: Path
    state_bytes: int  # of this save's tensors: the size estimate when no checkpoint is committed yet
    train_state: dict[str, Any]


@dataclass
class PendingSave:
    """A save in the background. When it fails, every rank's background thread stops its training
    thread's poll() count (`halt`) and the ranks agree on `raise_at`, one past the highest count: a
    halted poll() waits for that, so every rank raises at the same poll() (or the save()/close() before)."""
    step: int
    future: Future = field(default_factory=Future)
    polls: int = 0  # poll() calls since the save began
    halted: bool = False
    raise_at: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count_poll(self) -> tuple[int, bool, bool]:
        """Count a poll(): (its number, halted, done), read together."""
        with self.lock:
            self.polls += 1
            return self.polls, self.halted, self.future.done()

    def halt(self) -> int:
        """Background, on failure: the polls counted so far; the next poll() waits for `raise_at`."""
        with self.lock:
            self.halted = True
            return self.polls


class CheckpointManager:
    def __init__(self, run_dir: Path, keep: int, is_writer: bool, async_save: bool = False,
                 log: Callable[[str], None] = partial(print, flush=True)):
        self.folder = run_dir / "checkpoints"
        self.keep, self.is_writer, self.async_save, self.log = keep, is_writer, async_save, log
        self.pending: PendingSave | None = None
        self.pruning: Future | None = None
        # Background writes and commits run their collectives on a group of their own. One stager
        # for all saves where torch lets the caller keep it: its CPU copy of this rank's state (held
        # until close()) is reused, not allocated and first touched again at every save.
        self.async_group = dist.new_group(backend="gloo") if async_save and _distributed() else None
        self.stager = _stager() if async_save and STAGER_REUSABLE else None

    def committed(self) -> list[Path]:
        return committed_steps(self.folder)

    def latest(self) -> Path | None:
        steps = self.committed()
        return steps[-1] if steps else None

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             train_state: dict[str, Any]) -> None:
        """Write a checkpoint of `step` and commit it (both in the background with async_save). A write
        that fails raises CheckpointSpaceError (out of space) or CheckpointWriteError on every rank, here
        or, with async_save, from poll(), wait() or close(); its unfinished folder is removed."""
        self.wait()
        if self.is_writer and (warning := low_space_warning(self.folder.parent)):
            self.log(warning)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        job = SaveJob(step, self.folder / f".tmp-step-{step}", tensor_bytes(state), train_state)
        self._check(job, _attempt(self._prepare, job.tmp) if self.is_writer else None)
        writer = ShardWriter(job.tmp)
        if self.async_save:
            written = dcp.async_save(state, storage_writer=writer, process_group=self.async_group,
                                     async_stager=self.stager or _stager())
            self.pending = PendingSave(step)
            _in_background(self._commit_when_written, written, job, writer.records, self.pending,
                           future=self.pending.future)
        else:
            self._commit(job, writer.records, _attempt(dcp.save, state, storage_writer=writer))
            if self.is_writer:
                self.pruning = _in_background(self._prune)

    def poll(self) -> None:
        """Finish a background save that is done (local: no collective). A failed one raises at the
        poll() the ranks agreed on, the same on every rank."""
        pending = self.pending
        if pending is None:
            return
        count, halted, done = pending.count_poll()
        if halted:
            pending.future.exception()  # wait for the agreed raise_at
            if count >= pending.raise_at:
                self.wait()
        elif done:
            self.wait()

    def wait(self) -> None:
        """Wait for the background save (write and commit) and pruning, if any; raise what they raised."""
        pending, self.pending = self.pending, None
        pruning, self.pruning = self.pruning, None
        if pending is not None:
            pending.future.result()
        if pruning is not None:
            pruning.result()

    def close(self) -> None:
        """Wait for background work (raising what it raised), then release the stager's buffers and the
        background group."""
        try:
            self.wait()
        finally:
            if self.stager is not None:
                self.stager.close()
                self.stager = None
            if self.async_group is not None:
                dist.destroy_process_group(self.async_group)
                self.async_group = None

    @staticmethod
    def _prepare(tmp: Path) -> None:
        """Writer: an empty folder for the new checkpoint."""
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def _commit_when_written(self, written: Future, job: SaveJob, own: dict[str, dict], pending: PendingSave) -> None:
        """Background: once this rank's shards are written, commit (on the async group) and prune."""
        self._commit(job, own, _attempt(written.result), self.async_group, pending)
        if self.is_writer:
            self._prune()

    def _commit(self, job: SaveJob, own: dict[str, dict], write_error: BaseException | None,
                group: dist.ProcessGroup | None = None, pending: PendingSave | None = None) -> None:
        """Record every rank's files (`own`: this rank's, checksummed while written) in the manifest,
        mark the folder committed and rename it; or, when a rank's write failed (`write_error`: this
        rank's), discard the folder and raise on every rank (collective over `group`)."""
        parts = _all_gather((own, _described(write_error)), group)
        records = {name: record for part, _ in parts for name, record in part.items()}
        failure = _worst(failed for _, failed in parts)
        if failure is not None:
            self._fail(job, failure, write_error, group, pending)
        self._check(job, _attempt(self._write_commit, job, records) if self.is_writer else None, group, pending)

    def _write_commit(self, job: SaveJob, records: dict[str, dict]) -> None:
        """Writer: train_state.json, the manifest and the marker, then the rename that commits."""
        tmp = job.tmp
        (tmp / TRAIN_STATE).write_text(json.dumps(job.train_state))
        for name in (TRAIN_STATE, METADATA):
            fsync_path(tmp / name)
            records[name] = file_record(tmp / name)
        write_manifest(tmp, records)
        marker = tmp / COMMIT_MARKER
        marker.write_text(f"{job.step}\n")
        fsync_path(marker)
        final = self.folder / f"step-{job.step}"
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        try:
            fsync_path(self.folder)
        except OSError:
            final.rename(tmp)  # not durably committed: discarded with the rest
            raise

    def _check(self, job: SaveJob, error: BaseException | None, group: dist.ProcessGroup | None = None,
               pending: PendingSave | None = None) -> None:
        """Go on when no rank failed (`error`: this rank's); else discard the folder and raise on every
        rank (collective over `group`: also the barrier after each phase)."""
        failure = _worst(_all_gather(_described(error), group))
        if failure is not None:
            self._fail(job, failure, error, group, pending)

    def _fail(self, job: SaveJob, failure: WriteFailure, cause: BaseException | None,
              group: dist.ProcessGroup | None, pending: PendingSave | None) -> NoReturn:
        """The writer removes the unfinished folder and words the error; every rank raises it (collective).
        In the background, the ranks also agree on the poll() that raises it (`PendingSave`)."""
        polls = pending.halt() if pending is not None else 0
        message = None
        if self.is_writer:
            shutil.rmtree(job.tmp, ignore_errors=True)
            previous = self.latest()
            needed = (checkpoint_bytes(previous) if previous is not None else None) or job.state_bytes
            message = failure_message(failure, self.folder, job.step, needed, self.keep, previous)
        parts = _all_gather((message, polls), group)
        if pending is not None:
            pending.raise_at = max(count for _, count in parts) + 1
        raise failure_error(failure, next(m for m, _ in parts if m is not None)) from cause

    def _prune(self) -> None:
        """Delete the commits older than the newest `keep`, and folders a crash left unfinished."""
        kept = self.committed()[-self.keep:]
        for path in self.folder.iterdir():
            if path not in kept and path.is_dir() and (STEP_DIR.match(path.name) or path.name.startswith(".tmp-step-")):
                (path / COMMIT_MARKER).unlink(missing_ok=True)  # no longer a commit, even if deleting stops midway
                shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def verify(path: Path) -> None:
        """Check every file against the manifest, each rank a share; raise naming a bad file (collective)."""
        def check() -> None:
            records = read_manifest(path)
            verify_files(path, records, sorted(records)[_rank()::_world()])

        _raise_gathered(_problem(check))

    @staticmethod
    def check_intact(path: Path) -> None:
        """Cheap check before a load (local): every file at its recorded size, the small ones checksummed too."""
        records = read_manifest(path)
        for name, expected in records.items():
            check_size(path / name, expected)
        verify_files(path, records, [n for n in records if not n.endswith(SHARD_SUFFIX)])

    @staticmethod
    def read_train_state(path: Path) -> dict[str, Any]:
        return json.loads((path / TRAIN_STATE).read_text())

    @staticmethod
    def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             verify: bool = True) -> dict[str, Any]:
        """Load tensors into `model` and `optimizer`, resharding to the current layout; return the rest.
        With `verify`, each rank checksums its share of the shards on a thread while DCP reads them (one
        read from disk), and a file that does not match the manifest raises CorruptCheckpointError on
        every rank after the load: the tensors may then hold part of it (collective)."""
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        checked = _in_background(_verify_own_shards, path, read_manifest(path)) if verify else None
        try:
            dcp.load(state, storage_reader=InPlaceReader(path))
        except (Exception, CheckpointException):  # a corrupt shard can fail the load itself: name it then
            if checked is not None:
                _raise_gathered(checked.result())
            raise
        if checked is not None:
            _raise_gathered(checked.result())
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return CheckpointManager.read_train_state(path)
