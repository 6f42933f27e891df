"""`<run.dir>/events.jsonl`: one line per thing that happened to a run (start, resume, rollback,
straggler, done, stopped, failed), written by the writer rank, for people and `recipes.report`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class EventLog:
    def __init__(self, run_dir: Path, is_writer: bool):
        self.path, self.is_writer = run_dir / "events.jsonl", is_writer

    def write(self, event: str, step: int, **fields: Any) -> None:
        if self.is_writer:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"time": round(time.time(), 3), "event": event, "step": step, **fields}) + "\n")
