"""Save and load the full training state with torch.distributed.checkpoint.

A checkpoint is written into ``checkpoints/.tmp-step-<N>``; once every rank has written its part,
the writer rank drops a commit marker and renames the folder to ``step-<N>``. A folder without the
marker is never loaded. Tensors go through DCP (each rank writes its shards, names are global, so
another layout can read them); the small rest (step, tokens, LR schedule, data cursor, RNG, W&B id,
config) goes into ``train_state.json`` written by the writer rank.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

COMMIT_MARKER = "COMMITTED"
TRAIN_STATE = "train_state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def committed_steps(folder: Path) -> list[Path]:
    """Committed step folders, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name))
             and (p / COMMIT_MARKER).is_file()]
    return [p for _, p in sorted(found)]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    def __init__(self, run_dir: Path, keep: int, is_writer: bool):
        self.folder = run_dir / "checkpoints"
        self.keep, self.is_writer = keep, is_writer

    def latest(self) -> Path | None:
        steps = committed_steps(self.folder)
        return steps[-1] if steps else None

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             train_state: dict[str, Any]) -> Path:
        """Write, then commit, a checkpoint of `step`; prune older ones after the commit."""
        final = self.folder / f"step-{step}"
        tmp = self.folder / f".tmp-step-{step}"
        if self.is_writer:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        if self.is_writer:
            (tmp / TRAIN_STATE).write_text(json.dumps(train_state))
        _barrier()
        if self.is_writer:
            (tmp / COMMIT_MARKER).write_text(f"{step}\n")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in committed_steps(self.folder)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    @staticmethod
    def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Load tensors into `model` and `optimizer` (resharding as needed); return the rest."""
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return json.loads((path / TRAIN_STATE).read_text())
