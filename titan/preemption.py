"""Stopping on request: SIGTERM (preemption) and SIGINT (Ctrl-C).

Installed when a run starts. Before training, either signal stops the run at once (nothing is
saved yet, so nothing is lost). During training the first one asks for a checkpoint at the end of
the current step and a stop; the ranks agree on it, so they all save the same step. A second Ctrl-C
stops at once, without saving (the newest committed checkpoint stays). A SIGTERM that follows a
Ctrl-C (torchrun forwards the stop as SIGTERM) changes nothing.
"""

from __future__ import annotations

import os
import signal
import sys

import torch
import torch.distributed as dist

from titan.errors import INTERRUPT_EXIT

NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class PreemptionWatch:
    """Set by SIGTERM or SIGINT on any rank; `requested()` agrees across ranks (collective when distributed)."""

    def __init__(self, device: torch.device, announce: bool = True) -> None:
        self.device, self.announce = device, announce
        self.received: int | None = None  # the first signal received during training
        self.training = False
        for signum in NAMES:
            signal.signal(signum, self._on_signal)

    def start_training(self) -> None:
        """From here on a signal saves and stops at the next step end instead of stopping at once."""
        self.training = True

    def _on_signal(self, signum: int, frame) -> None:
        if not self.training:
            self._stop_now(signum, "before training started; nothing to save")
        if self.received is None:
            self.received = signum
            self._say(f"{NAMES[signum]}: saving a checkpoint at the end of this step, then stopping"
                     + (" (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else ""))
        elif signum == signal.SIGINT:
            self._stop_now(signum, "again: stopped without saving; the newest committed checkpoint is kept")

    def _say(self, line: str) -> None:
        """One line on stderr, written straight to the descriptor (print is not safe in a signal handler)."""
        if self.announce:
            os.write(sys.stderr.fileno(), (line + "\n").encode())

    def _stop_now(self, signum: int, why: str) -> None:
        self._say(f"{NAMES[signum]} {why}.")
        os._exit(INTERRUPT_EXIT if signum == signal.SIGINT else 128 + signum)

    @property
    def exit_code(self) -> int:
        """0 after a SIGTERM save-and-stop (the job may be requeued), 130 after Ctrl-C."""
        return INTERRUPT_EXIT if self.received == signal.SIGINT else 0

    def requested(self) -> bool:
        local = self.received is not None
        if dist.is_initialized() and dist.get_world_size() > 1:
            value = torch.tensor([1.0 if local else 0.0], device=self.device)
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
            return bool(value.item())
        return local
