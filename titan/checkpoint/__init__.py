"""Distributed checkpoints (DCP) with an atomic commit, keep-last-k and resume."""

from titan.checkpoint.manager import COMMIT_MARKER, CheckpointManager, committed_steps, low_space_warning
from titan.checkpoint.space import CheckpointSpaceError, CheckpointWriteError

__all__ = ["COMMIT_MARKER", "CheckpointManager", "CheckpointSpaceError", "CheckpointWriteError", "committed_steps",
           "low_space_warning"]
