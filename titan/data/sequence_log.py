"""A record of which sequences each step trained on, to prove exactly-once data across resumes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist


class SequenceIdLog:
    """Gathers every data-parallel rank's sequence ids per step; the writer appends them, in
    data-parallel rank order, to `<run.dir>/sequence_ids.jsonl`."""

    def __init__(self, run_dir: Path, dp_group: dist.ProcessGroup | None, is_writer: bool):
        self.path = run_dir / "sequence_ids.jsonl"
        self.group, self.is_writer = dp_group, is_writer

    def __call__(self, step: int, batches: list[dict]) -> None:
        local = torch.cat([b["ids"] for b in batches]).tolist()
        parts = [local]
        if self.group is not None:
            parts = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(parts, local, group=self.group)
        if self.is_writer:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, "ids": [i for part in parts for i in part]}) + "\n")
