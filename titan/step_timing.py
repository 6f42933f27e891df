"""Per-rank step times and straggler warnings.

Each rank times every step twice: wall-clock time, and compute time: the CPU time its process
spent, which time blocked in a collective waiting for a slower peer does not add to (gloo waits
sleep), so a slow rank shows as the one that computes longest while the wall times are all alike.
On logged steps the times are gathered to the writer: `step_time_max` / `step_time_min` (compute
seconds), `slowest_rank` in the metrics, every rank's times in `<run.dir>/ranks.jsonl`, and a
warning (and an event) naming the rank and host when one computes `straggler_factor` times as long
as the median of the others on `straggler_patience` logged steps in a row.
On GPUs the CPU time counts the host's work only; a device-side measure is left to come.
"""

from __future__ import annotations

import json
import socket
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from titan.config import HealthConfig
from titan.events import EventLog


class StepTiming:
    def __init__(self, run_dir: Path, cfg: HealthConfig, device: torch.device, is_writer: bool, events: EventLog,
                 log: Callable[[str], None]):
        self.path, self.cfg, self.device, self.is_writer = run_dir / "ranks.jsonl", cfg, device, is_writer
        self.events, self.log = events, log
        self.wall = self.cpu = self.wall_start = self.cpu_start = 0.0
        self.hosts: list[str] | None = None
        self.streak: dict[int, int] = {}

    def begin(self, step: int) -> None:
        self.wall_start, self.cpu_start = time.perf_counter(), time.process_time()

    def end(self, step: int) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall_start, time.process_time() - self.cpu_start

    def metrics(self, step: int) -> dict[str, Any]:
        """Every rank's times of this step (collective: every rank calls it on logged steps)."""
        mine = torch.tensor([self.wall, self.cpu], dtype=torch.float64, device=self.device)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world > 1:
            every = torch.empty(world * 2, dtype=torch.float64, device=self.device)
            dist.all_gather_into_tensor(every, mine)
        else:
            every = mine
        if self.hosts is None:
            self.hosts = [socket.gethostname()] * world
            if world > 1:
                dist.all_gather_object(self.hosts, socket.gethostname())
        wall, compute = every.view(-1, 2).T.tolist()
        slowest = max(range(world), key=lambda r: compute[r])
        record: dict[str, Any] = {"step_time_max": compute[slowest], "step_time_min": min(compute),
                                  "slowest_rank": slowest}
        if self.is_writer:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "compute_s": compute, "step_s": wall, "hosts": self.hosts}) + "\n")
            warnings = self._stragglers(step, compute)
            if warnings:
                record["straggler"] = "; ".join(warnings)
        return record

    def _stragglers(self, step: int, compute: list[float]) -> list[str]:
        """Warnings for the ranks that just became stragglers (printed, and events)."""
        warnings: list[str] = []
        if len(compute) < 2:
            return warnings
        for rank, seconds in enumerate(compute):
            others = statistics.median(compute[:rank] + compute[rank + 1:])
            factor = seconds / max(others, 1e-9)
            self.streak[rank] = self.streak.get(rank, 0) + 1 if factor >= self.cfg.straggler_factor else 0
            if self.streak[rank] == self.cfg.straggler_patience:
                host = self.hosts[rank]
                text = (f"rank {rank} on {host} computes {factor:.1f}x as long as the median of the other ranks, "
                        f"{self.streak[rank]} logged steps in a row (step {step})")
                self.log(f"warning: straggler: {text}. Every rank waits for it at each collective; check that host "
                         f"(thermal throttling, a noisy neighbour, a slow disk or NIC). Per-rank times: {self.path}")
                self.events.write("straggler", step, rank=rank, host=host, factor=round(factor, 3))
                warnings.append(text)
        return warnings
