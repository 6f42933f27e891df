"""The run folder: checked writable before any work, and owned by one run at a time.

A run takes an exclusive lock on ``<run.dir>/run.lock`` before it writes anything and holds it
until its process ends (``flock``: the operating system releases it when the process dies, so a
crashed run never blocks the resume). The file names the holder's host and pid, so a second run in
the same folder is refused with a message saying who has it. On file systems without working locks
(``flock`` fails with ENOLCK/EOPNOTSUPP, e.g. Lustre mounted without ``-o flock``) the run warns and
goes on unprotected: nothing then stops two runs from sharing the folder.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import IO, Callable

from titan.config import ConfigError

LOCK_FILE = "run.lock"
LOCKS_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def check_writable(run_dir: Path) -> None:
    """Create `run_dir` and a probe file in it (write, fsync, remove); refuse a folder that fails."""
    probe = run_dir / f".probe-{socket.gethostname()}-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with probe.open("wb") as f:
            f.write(b"probe")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        raise ConfigError("run.dir", f"{run_dir} cannot be written ({exc.strerror or exc}: "
                          f"{exc.filename or run_dir}).",
                          "point run.dir at a folder on a writable file system (e.g. run.dir=runs/<name> "
                          "under your home or a scratch disk).") from exc


class RunDirLock:
    """An exclusive lock on the run folder, held until `release()` or the process ends."""

    def __init__(self, run_dir: Path, warn: Callable[[str], None] = print):
        self.path = run_dir / LOCK_FILE
        self.file: IO[str] | None = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            self.release()
            raise ConfigError("run.dir", f"{run_dir} is in use by another run ({holder}); two runs in one "
                              "folder would overwrite each other's metrics and checkpoints.",
                              "wait for that run to end (or stop it), or give this one its own run.dir=<folder>.")
        except OSError as exc:
            if exc.errno not in LOCKS_UNSUPPORTED:
                raise
            warn(f"warning: the file system of {run_dir} does not support locks ({exc.strerror}); nothing stops "
                 "a second run from using this folder at the same time, so start only one.")
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"host {socket.gethostname()} pid {os.getpid()} since "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()

    def _holder(self) -> str:
        self.file.seek(0)
        text = self.file.read().strip()
        return text or "host and pid not yet recorded"

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the only descriptor drops the lock
            self.file = None
