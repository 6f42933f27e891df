"""Checkpoint writes that fail, told in one paragraph instead of a C++ traceback.

A write can fail in three places: in DCP's shard writes (torch.save, which turns the OS error of a
short write into ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``; the
`ShardWriter` restores the OS error where it can), in DCP's ``.metadata`` write (an OSError inside
DCP's ``CheckpointException``, which carries every rank's failure), and in the commit
(``train_state.json``, manifest, marker: a plain OSError). `classify` looks through all of these:
ENOSPC / EDQUOT, or torch's short-write messages, make a `CheckpointSpaceError`; any other OS error a
`CheckpointWriteError`. Both end the run with exit code 4 (`titan.errors.STORAGE_EXIT`).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.distributed.checkpoint.api import CheckpointException

from titan.checkpoint.manifest import CorruptCheckpointError, read_manifest
from titan.errors import StorageError

SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# What torch's inline_container.cc says when a write fails midway, and the OS's words for no space.
SPACE_MESSAGES = ("unexpected pos", "file write failed", os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))
SPACE, STORAGE, OTHER = "space", "storage", "other"  # failure kinds, the most telling first


class CheckpointWriteError(StorageError):
    """A checkpoint could not be written (read-only or failing storage); the previous commit is intact."""


class CheckpointSpaceError(CheckpointWriteError):
    """A checkpoint did not fit: no space or quota left on run.dir's disk; the previous commit is intact."""


class WriteFailure(NamedTuple):
    """What went wrong on one rank, small enough to gather: its kind (SPACE, STORAGE, OTHER) and detail."""
    kind: str
    detail: str
    rank: int

    def order(self) -> tuple[int, int]:
        """Sort key: the most telling failure (out of space, then storage, then other) of the lowest rank."""
        return (SPACE, STORAGE, OTHER).index(self.kind), self.rank


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, its causes and contexts, and the per-rank failures a CheckpointException carries."""
    todo, seen = [exc], set()
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__]
        if isinstance(current, CheckpointException):
            todo += [failure[0] if isinstance(failure, tuple) else failure for failure in current.failures.values()]


def classify(exc: BaseException, rank: int) -> WriteFailure:
    """Out of space, another storage error, or something else (a bug), with the most telling detail."""
    chain = [e for e in exception_chain(exc) if not isinstance(e, CheckpointException)]  # its failures stay
    os_errors = [e for e in chain if isinstance(e, OSError)]
    for error in os_errors:
        if error.errno in SPACE_ERRNOS:
            return WriteFailure(SPACE, str(error), rank)
    for error in chain:
        if any(m in str(error) for m in SPACE_MESSAGES):
            return WriteFailure(SPACE, f"a write stopped short ({_first_line(error)})", rank)
    if os_errors:
        return WriteFailure(STORAGE, str(os_errors[0]), rank)
    root = chain[0] if chain else exc
    return WriteFailure(OTHER, f"{type(root).__name__}: {_first_line(root)}", rank)


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), "")


def tensor_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state dict; a DTensor counts whole, as the checkpoint stores it."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(v) for v in state)
    return 0


def checkpoint_bytes(path: Path) -> int | None:
    """Size of a committed checkpoint: the sum of its manifest's file sizes (None when unreadable)."""
    try:
        return sum(record["size"] for record in read_manifest(path).values())
    except (OSError, ValueError, KeyError, CorruptCheckpointError):
        return None


def free_bytes(path: Path) -> int:
    """Bytes free to this user on the file system of `path` (or of its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def describe_bytes(n: int) -> str:
    return f"{n:,} bytes ({n / 2**20:.1f} MiB)"


def low_space_line(folder: Path, latest: Path | None) -> str | None:
    """One warning line when `folder`'s disk has less free space than the checkpoint `latest` takes."""
    size = checkpoint_bytes(latest) if latest is not None else None
    free = free_bytes(folder)
    if size is None or free >= size:
        return None
    return (f"warning: only {describe_bytes(free)} free on the disk of {folder}, less than the "
            f"{describe_bytes(size)} of the last checkpoint {latest.name}: the next checkpoint will likely not fit. "
            "Free space, lower checkpoint.keep or move the run to a larger disk (run.dir).")


def failure_error(failure: WriteFailure, message: str) -> Exception:
    """The exception every rank raises for `failure`, with the writer's `message`."""
    if failure.kind == SPACE:
        return CheckpointSpaceError(message)
    return CheckpointWriteError(message) if failure.kind == STORAGE else RuntimeError(message)


def failure_message(failure: WriteFailure, folder: Path, step: int, needed: int, keep: int,
                    previous: Path | None) -> str:
    """One paragraph: what failed where, the bytes needed and free (out of space), and what to do."""
    if failure.kind == OTHER:
        return f"the checkpoint of step {step} failed on rank {failure.rank}: {failure.detail}"
    resume = (f"the previous checkpoint {previous.name} is intact, and the same command resumes from it"
              if previous is not None else "there is no earlier checkpoint, so the same command starts from step 0")
    removed = f"The unfinished folder .tmp-step-{step} was removed; {resume}."
    if failure.kind == STORAGE:
        return (f"the checkpoint of step {step} could not be written to {folder}: {failure.detail}. {removed} Fix: "
                "make run.dir's file system writable and healthy again (see the OS error), or move the run folder "
                "to a working disk and point run.dir at it; then rerun the same command.")
    free = free_bytes(folder)
    short = f"at least {describe_bytes(needed - free)}" if needed > free else "space (or raise your quota)"
    return (f"the checkpoint of step {step} did not fit in {folder}: {failure.detail}. It needs about "
            f"{describe_bytes(needed)} and {describe_bytes(free)} are free there. {removed} Fix: free {short} on "
            f"that disk (older checkpoints than the newest can go, and a lower checkpoint.keep, now {keep}, keeps "
            "fewer from now on), or move the run folder to a larger disk and point run.dir at it; then rerun the "
            "same command.")
