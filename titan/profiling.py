"""Profiles of chosen steps (`profile.steps=[first,last]`): a `torch.profiler` trace per rank.

The trace of steps first..last goes to `<run.dir>/profile/rank-<N>-steps-<first>-<last>.json`
(Chrome trace format: open it in https://ui.perfetto.dev or chrome://tracing); on GPUs a CUDA
memory snapshot of the same steps goes next to it, `rank-<N>-steps-<first>-<last>-memory.pickle`
(drag it into https://pytorch.org/memory_viz). Off by default: the hook then compares two integers
per step. A run resumed inside the window traces the rest of it; a run that stops inside the
window (preemption, a failure) writes no trace.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from titan.config import ConfigError


def check_profile(steps: Sequence[int], training_steps: int) -> None:
    """`profile.steps` is empty or [first, last] with 1 <= first <= last <= training.steps."""
    steps = list(steps)
    if not steps:
        return
    if len(steps) != 2 or not 1 <= steps[0] <= steps[1] <= training_steps:
        raise ConfigError("profile.steps", f"{steps} is not [first, last] with 1 <= first <= last <= "
                          f"training.steps={training_steps}.",
                          "give two steps, e.g. profile.steps=[10,12], or profile.steps=[] for no profile.")


class StepProfiler:
    """Step hook: starts `torch.profiler` when the window's first step begins, writes the trace when
    its last step ends."""

    def __init__(self, steps: Sequence[int], run_dir: Path, rank: int, device: torch.device,
                 log: Callable[[str], None] = print):
        self.window = (steps[0], steps[1]) if len(steps) == 2 else None
        self.folder, self.rank, self.device, self.log = Path(run_dir) / "profile", rank, device, log
        self.profiler: torch.profiler.profile | None = None
        self.first = 0
        self.done = False

    def begin(self, step: int) -> None:
        if self.window is None or self.profiler is not None or self.done:
            return
        if self.window[0] <= step <= self.window[1]:
            self.first = step
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.memory._record_memory_history(max_entries=100_000)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
            self.profiler.start()

    def end(self, step: int) -> None:
        if self.profiler is None or step < self.window[1]:
            return
        self.profiler.stop()
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = self.folder / f"rank-{self.rank}-steps-{self.first}-{step}"
        self.profiler.export_chrome_trace(f"{stem}.json")
        self.profiler, self.done = None, True
        memory = ""
        if self.device.type == "cuda":
            torch.cuda.memory._dump_snapshot(f"{stem}-memory.pickle")
            torch.cuda.memory._record_memory_history(enabled=None)
            memory = " and a CUDA memory snapshot rank-<N>-...-memory.pickle (https://pytorch.org/memory_viz)"
        self.log(f"profile: steps {self.first}-{step} traced: {self.folder}/rank-<N>-steps-{self.first}-{step}.json "
                 f"for each rank (open in https://ui.perfetto.dev){memory}")
