"""Distributed checkpoints (DCP) with an atomic commit, keep-last-k and resume."""

from titan.checkpoint.manager import COMMIT_MARKER, CheckpointManager, committed_steps

__all__ = ["COMMIT_MARKER", "CheckpointManager", "committed_steps"]
