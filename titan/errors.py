"""Errors that end a run on purpose, each with the exit code scripts and schedulers can tell apart.

Exit codes: 0 done (also after a SIGTERM save-and-stop), 2 config error (`ConfigError`, before any
work), 3 a peer rank died or hung, 4 a checkpoint could not be written (disk full, read-only or
failing storage), 5 a step had a non-finite loss or gradient norm, 130 stopped by Ctrl-C.
"""

from __future__ import annotations

STORAGE_EXIT = 4
NON_FINITE_EXIT = 5
INTERRUPT_EXIT = 130


class RunStopped(RuntimeError):
    """The run stopped for a reason its message explains; `exit_code` says which kind."""

    exit_code = 1


class StorageError(RunStopped):
    """A file of the run could not be written (disk full, read-only or failing storage)."""

    exit_code = STORAGE_EXIT


class NonFiniteStepError(RunStopped):
    """A step's loss or gradient norm is NaN or infinite: nothing of it was applied or saved."""

    exit_code = NON_FINITE_EXIT
