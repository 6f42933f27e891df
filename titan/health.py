"""The step health policy: which steps are applied, skipped, or end the run.

A step is bad when its loss or gradient norm is not finite, or spikes: more than `spike_sigmas`
standard deviations above the mean of the last `spike_window` applied steps (once `spike_min_steps`
are there; OLMo-core's rule). Both numbers are global (reduced over every rank before they get
here), so every rank reaches the same verdict without talking. With `policy=skip` a bad step is not
applied (no optimizer update, no LR-schedule step) and counted; `max_consecutive_skips` bad steps
in a row ask for a rollback to the newest checkpoint past the data that caused them. With
`policy=fail` the first non-finite step ends the run (exit 5), as before; spikes are applied.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from titan.config import HealthConfig
from titan.errors import NON_FINITE_FIX, NonFiniteStepError

POLICIES = ("skip", "fail")


class HealthPolicy:
    def __init__(self, cfg: HealthConfig):
        self.cfg = cfg
        self.losses: deque[float] = deque(maxlen=cfg.spike_window)
        self.norms: deque[float] = deque(maxlen=cfg.spike_window)
        self.consecutive = 0

    def judge(self, step: int, loss: float, grad_norm: float) -> str | None:
        """Why step `step` must not be applied, or None to apply it (and remember its numbers)."""
        problem = self._problem(loss, grad_norm)
        if problem is None or (self.cfg.policy == "fail" and math.isfinite(loss) and math.isfinite(grad_norm)):
            self.consecutive = 0
            self.losses.append(loss)
            self.norms.append(grad_norm)
            return None
        if self.cfg.policy == "fail":
            raise NonFiniteStepError(
                f"step {step}: {problem}. The update was not applied and no checkpoint of this step was written. "
                f"Fix: {NON_FINITE_FIX}; or set training.health.policy=skip to skip such steps and go on.")
        self.consecutive += 1
        return problem

    def wants_rollback(self) -> bool:
        """Whether the bad steps in a row reached `max_consecutive_skips`."""
        return self.consecutive >= self.cfg.max_consecutive_skips

    def _problem(self, loss: float, grad_norm: float) -> str | None:
        bad = [f"the {name} is {value}" for name, value in (("loss", loss), ("gradient norm", grad_norm))
               if not math.isfinite(value)]
        if bad:
            return " and ".join(bad)
        if not self.cfg.spike_sigmas or len(self.losses) < max(self.cfg.spike_min_steps, 2):
            return None
        for name, value, window in (("loss", loss, self.losses), ("gradient norm", grad_norm, self.norms)):
            mean = sum(window) / len(window)
            std = math.sqrt(sum((v - mean) ** 2 for v in window) / len(window))  # plain floats: microseconds
            if value > mean + self.cfg.spike_sigmas * std:
                return (f"the {name} {value:.4g} spiked {(value - mean) / max(std, 1e-12):.1f} standard deviations "
                        f"above the last {len(window)} steps (mean {mean:.4g})")
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "norms": list(self.norms), "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses.clear()
        self.norms.clear()
        self.losses.extend(state.get("losses", []))
        self.norms.extend(state.get("norms", []))
        self.consecutive = state.get("consecutive", 0)
