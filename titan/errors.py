"""Errors that end a run on purpose, each with the exit code scripts and schedulers can tell apart.

Exit codes: 0 done (also after a SIGTERM save-and-stop), 2 config error (`ConfigError`, before any
work), 3 a peer rank died or hung, 4 a checkpoint could not be written (disk full, read-only or
failing storage), 5 a step had a non-finite loss or gradient norm, 130 stopped by Ctrl-C.
"""

from __future__ import annotations

STORAGE_EXIT = 4
NON_FINITE_EXIT = 5
INTERRUPT_EXIT = 130

# What to do about non-finite or runaway steps, in every message that stops a run for them.
NON_FINITE_FIX = ("lower optim.lr (or raise lr.warmup_steps, or set training.grad_clip), check the data (data.skip_ranges "
                  "skips ranges of it by hand), then rerun the same command: it resumes from the newest committed "
                  "checkpoint with the new settings")


class RunStopped(RuntimeError):
    """The run stopped for a reason its message explains; `exit_code` says which kind."""

    exit_code = 1


class StorageError(RunStopped):
    """A file of the run could not be written (disk full, read-only or failing storage)."""

    exit_code = STORAGE_EXIT


class NonFiniteStepError(RunStopped):
    """A step's loss or gradient norm is NaN or infinite: nothing of it was applied or saved."""

    exit_code = NON_FINITE_EXIT
