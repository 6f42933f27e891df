"""Save, commit and load the full training state with torch.distributed.checkpoint (DCP).

A checkpoint is written into ``checkpoints/.tmp-step-<N>``: each rank writes its shards (DCP, global
parameter names, so any layout can read them), the writer rank adds ``train_state.json`` (step,
tokens, LR schedule, data cursor, RNG, W&B id, config). Once every rank has finished, the writer
records every file's size and checksum in ``manifest.json``, drops the ``COMMITTED`` marker and
renames the folder to ``step-<N>``. A folder without the marker is never loaded, and older
checkpoints are pruned only after a new commit. With ``async_save`` the shards are written in the
background while training goes on; the commit happens at the first step end after every rank has
finished, and before the next save or the end of the run.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from titan.checkpoint.manifest import (
    CorruptCheckpointError,
    file_record,
    fsync_path,
    read_manifest,
    verify_files,
    write_manifest,
)

COMMIT_MARKER = "COMMITTED"
TRAIN_STATE = "train_state.json"
METADATA = ".metadata"
STEP_DIR = re.compile(r"^step-(\d+)$")
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def committed_steps(folder: Path) -> list[Path]:
    """Committed step folders, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name))
             and (p / COMMIT_MARKER).is_file()]
    return [p for _, p in sorted(found)]


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _all_gather(obj: Any) -> list[Any]:
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@dataclass
class PendingSave:
    step: int
    folder: Path
    future: Future
    train_state: dict[str, Any]


class CheckpointManager:
    def __init__(self, run_dir: Path, keep: int, is_writer: bool, async_save: bool = False):
        self.folder = run_dir / "checkpoints"
        self.keep, self.is_writer, self.async_save = keep, is_writer, async_save
        self.pending: PendingSave | None = None
        # Background writes finish with their own collectives: give them their own group.
        self.async_group = dist.new_group(backend="gloo") if async_save and _distributed() else None

    def committed(self) -> list[Path]:
        return committed_steps(self.folder)

    def latest(self) -> Path | None:
        steps = self.committed()
        return steps[-1] if steps else None

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             train_state: dict[str, Any]) -> None:
        """Write a checkpoint of `step` (in the background with async_save) and commit it."""
        self.wait()
        tmp = self.folder / f".tmp-step-{step}"
        if self.is_writer:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.async_group)
            self.pending = PendingSave(step, tmp, future, train_state)
        else:
            dcp.save(state, checkpoint_id=str(tmp))
            self._commit(step, tmp, train_state)

    def poll(self) -> None:
        """Commit a background save once every rank has finished writing (collective)."""
        if self.pending is None:
            return
        if all(_all_gather(self.pending.future.done())):
            self.wait()

    def wait(self) -> None:
        """Finish and commit a background save, if any (collective)."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        pending.future.result()
        self._commit(pending.step, pending.folder, pending.train_state)

    def _commit(self, step: int, tmp: Path, train_state: dict[str, Any]) -> None:
        """Record every rank's files in the manifest, mark the folder committed, rename, prune."""
        own = {p.name: file_record(p) for p in tmp.glob(f"__{_rank()}_*.distcp")}
        records: dict[str, dict] = {}
        for part in _all_gather(own):
            records.update(part)
        if self.is_writer:
            (tmp / TRAIN_STATE).write_text(json.dumps(train_state))
            for name in (TRAIN_STATE, METADATA):
                fsync_path(tmp / name)
                records[name] = file_record(tmp / name)
            write_manifest(tmp, records)
            marker = tmp / COMMIT_MARKER
            marker.write_text(f"{step}\n")
            fsync_path(marker)
            final = self.folder / f"step-{step}"
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            fsync_path(self.folder)
            for old in committed_steps(self.folder)[:-self.keep] + list(self.folder.glob(".tmp-step-*")):
                shutil.rmtree(old, ignore_errors=True)  # older commits, and saves a crash left unfinished
        _barrier()

    @staticmethod
    def verify(path: Path) -> None:
        """Check every file against the manifest, each rank a share; raise naming a bad file."""
        problem = None
        try:
            records = read_manifest(path)
            world = dist.get_world_size() if _distributed() else 1
            names = sorted(records)[_rank()::world]
            verify_files(path, records, names)
        except CorruptCheckpointError as exc:
            problem = (str(exc.path), str(exc))
        found = [p for p in _all_gather(problem) if p is not None]
        if found:
            raise CorruptCheckpointError(Path(found[0][0]), found[0][1].split(" is ", 1)[-1])

    @staticmethod
    def read_train_state(path: Path) -> dict[str, Any]:
        return json.loads((path / TRAIN_STATE).read_text())

    @staticmethod
    def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Load tensors into `model` and `optimizer`, resharding to the current layout; return the rest."""
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return CheckpointManager.read_train_state(path)
