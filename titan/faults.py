"""Fault injection (`debug.*`), to try the health policies on purpose: a NaN or a spike in the loss
and gradients at chosen steps, and a rank that computes slower. Off by default; the hang
injection lives with the watchdog (:mod:`titan.watchdog`)."""

from __future__ import annotations

import time

import torch

from titan.config import ConfigError, DebugConfig


def check_faults(cfg: DebugConfig, steps: int, world_size: int) -> None:
    """Refuse injections that could never happen in this run."""
    for key in ("nan_steps", "spike_steps"):
        outside = [s for s in getattr(cfg, key) if not 1 <= s <= steps]
        if outside:
            raise ConfigError(f"debug.{key}", f"steps {outside} are outside this run's steps 1..{steps}.",
                              f"list steps between 1 and training.steps={steps}.")
    if cfg.slow_rank >= world_size:
        raise ConfigError("debug.slow_rank", f"rank {cfg.slow_rank} does not exist in a job of {world_size} ranks.",
                          f"choose a rank below {world_size}, or -1 for none.")
    if cfg.slow_factor < 1 or cfg.spike_factor <= 0:
        key = "debug.slow_factor" if cfg.slow_factor < 1 else "debug.spike_factor"
        raise ConfigError(key, "must be >= 1 (slow_factor) / > 0 (spike_factor).", f"set {key} to a larger value.")


class FaultInjection:
    """Also a step hook: the slow rank spins at the end of each step."""

    def __init__(self, cfg: DebugConfig, rank: int):
        self.cfg, self.rank = cfg, rank
        self.started = 0.0
        self.injected: set[int] = set()  # a step replayed after a rollback trains on other data: no fault

    def begin(self, step: int) -> None:
        self.started = time.process_time()

    def end(self, step: int) -> None:
        """On the slow rank: compute (spin) for (slow_factor - 1) x the step's compute time more."""
        if self.rank == self.cfg.slow_rank:
            deadline = time.perf_counter() + (self.cfg.slow_factor - 1) * (time.process_time() - self.started)
            while time.perf_counter() < deadline:
                pass

    def after_backward(self, step: int, loss: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
        """The step's global loss, made NaN or spiked (and the gradients with it) where asked, the
        first time the step runs."""
        factor = float("nan") if step in self.cfg.nan_steps else (
            self.cfg.spike_factor if step in self.cfg.spike_steps else None)
        if factor is None or step in self.injected:
            return loss
        self.injected.add(step)
        torch._foreach_mul_(grads, factor)
        return loss * factor
