"""Preemption: SIGTERM asks the job to save a checkpoint at the next step end and stop."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class PreemptionWatch:
    """Set by SIGTERM on any rank; `requested()` agrees across ranks (collective when distributed)."""

    def __init__(self, device: torch.device) -> None:
        self.flag, self.device = False, device
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.flag = True

    def requested(self) -> bool:
        if dist.is_initialized() and dist.get_world_size() > 1:
            value = torch.tensor([1.0 if self.flag else 0.0], device=self.device)
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
            return bool(value.item())
        return self.flag
