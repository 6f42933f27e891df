"""The planner's prediction for the run being trained, logged beside what it measures."""

from __future__ import annotations

import dataclasses
from typing import Any

from parallel.mesh import ParallelDims
from titan.config import PretrainConfig
from titan.planner.plan import make_plan

PREDICTION_STEP = 1


class PlanPrediction:
    """A metric source (`titan.trainer.MetricSource`): `plan_mem_gb` (rank 0's predicted peak, as
    `mem_gb` measures it) and `plan_tokens_per_s` in the record of step 1."""

    def __init__(self, cfg: PretrainConfig, dims: ParallelDims):
        parallel = dataclasses.replace(cfg.parallel, dp_replicate=dims.dp_replicate, dp_shard=dims.dp_shard,
                                       hierarchical=False)
        plan = make_plan(dataclasses.replace(cfg, parallel=parallel), cfg.cluster, dims.world_size)
        self.values = {"plan_mem_gb": plan.memory[0].peak / 1e9, "plan_tokens_per_s": plan.time.tokens_per_s}

    def metrics(self, step: int) -> dict[str, Any]:
        return self.values if step == PREDICTION_STEP else {}
