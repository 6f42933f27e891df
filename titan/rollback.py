"""Rolling a run back past bad data: after `training.health.max_consecutive_skips` bad steps in a
row, every rank loads the newest committed checkpoint and goes on from it, never drawing again the
global positions consumed since it (the window whose batches led to the bad steps). The window is
recorded in `<run.dir>/skipped_data.jsonl` (with the logged numbers of the undone steps) and in the
data cursor (so every later checkpoint, resume and layout honours it); the metrics and sequence-id
logs lose their rows past the checkpoint, as on a resume. A second run of bad steps right after a rollback, before any newer checkpoint, stops the run
(exit 5) instead of looping."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from titan.checkpoint import CheckpointManager
from titan.checkpoint.resume import load_newest_intact, restore_train_state
from titan.config import PretrainConfig
from titan.data.loader import data_cursor, skipping
from titan.errors import NON_FINITE_FIX, NonFiniteStepError
from titan.events import EventLog
from titan.health import HealthPolicy
from titan.metrics import MetricsLogger, read_jsonl, strict_json, truncate_after_step
from titan.optim import build_scheduler
from titan.trainer import TrainState


class Rollback:
    def __init__(self, cfg: PretrainConfig, manager: CheckpointManager, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, loader: Any, health: HealthPolicy, config_now: dict,
                 metrics: MetricsLogger, events: EventLog, run_dir: Path, is_writer: bool, log: Callable[[str], None]):
        self.cfg, self.manager, self.model, self.optimizer, self.loader = cfg, manager, model, optimizer, loader
        self.health, self.config_now, self.metrics, self.events = health, config_now, metrics, events
        self.run_dir, self.is_writer, self.log = run_dir, is_writer, log
        self.last_target: Path | None = None

    def __call__(self, state: TrainState) -> tuple[TrainState, torch.optim.lr_scheduler.LRScheduler, Iterator[dict]]:
        bad = self.health.consecutive
        self.manager.wait()  # a save in flight is committed first: it may be the one to go back to
        target = self.manager.latest()
        if target is None or target == self.last_target:
            why = ("there is no committed checkpoint to go back to (set checkpoint.interval)" if target is None else
                   f"the run was rolled back to {target.name} already and went bad again before a newer checkpoint")
            raise NonFiniteStepError(
                f"step {state.step}: {bad} bad steps in a row (training.health.max_consecutive_skips), and {why}. "
                f"Fix: {NON_FINITE_FIX}.")
        end = data_cursor(self.loader.state_dict())
        _, saved = load_newest_intact([target], "fail", self.config_now, self.model, self.optimizer, self.log,
                                      self.cfg.checkpoint.new_data_seed)
        window = [data_cursor(saved["data"]), end]
        step, tokens, skipped = restore_train_state({**saved, "data": skipping(saved["data"], [window])},
                                                    self.optimizer, self.cfg.optim, self.loader, self.health)
        restored = TrainState(step=step, tokens=tokens, skipped=skipped)
        self.last_target = target
        if self.is_writer:
            dropped = [{k: row[k] for k in ("step", "loss", "grad_norm", "skip_reason") if k in row}
                       for row in read_jsonl(self.run_dir / "metrics.jsonl") if row["step"] > step] if (
                self.run_dir / "metrics.jsonl").is_file() else []
            for name in ("sequence_ids.jsonl", "ranks.jsonl"):
                truncate_after_step(self.run_dir / name, step)
            self.metrics.truncate_after(step)
            record = {"step": state.step, "rolled_back_to": step, "ranges": [window], "bad_steps": bad,
                      "dropped": dropped}  # the logged rows of the steps undone
            with (self.run_dir / "skipped_data.jsonl").open("a", encoding="utf-8") as f:
                f.write(strict_json(record) + "\n")
        self.events.write("rollback", state.step, rolled_back_to=step, ranges=[window])
        self.log(f"rollback: {bad} bad steps in a row up to step {state.step}; back to {target.name}, never drawing "
                 f"the global positions {window[0]}..{window[1] - 1} again (recorded in skipped_data.jsonl)")
        scheduler = build_scheduler(self.optimizer, self.cfg.lr, self.cfg.training.steps, step - skipped)
        return restored, scheduler, iter(self.loader)
