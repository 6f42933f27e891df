"""A layout as the planner sees it: the degrees, the pipeline cut, the micro-batches and the blocks
each pp rank holds, validated by the same checks the recipe runs before it builds anything."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from parallel.mesh import ParallelDims
from parallel.plan import ModelPlan
from parallel.pipeline import PipelineLayout, schedule_actions
from titan.build import check_layout, pipeline_layout, pipeline_microbatches
from titan.config import PretrainConfig, validate


STEADY_STATE_ROUNDS = 4


@dataclass(frozen=True)
class PlannedLayout:
    cfg: PretrainConfig
    dims: ParallelDims
    pipeline: PipelineLayout | None  # None without pipeline parallelism
    microbatches: int  # forward/backward passes per step on each rank (accumulation or pipeline microbatches)
    micro_batch: int  # sequences in each of them

    @property
    def local_tokens(self) -> int:
        """Tokens of one micro-batch on one rank (context parallelism splits the sequence)."""
        return self.micro_batch * self.cfg.training.seq_len // self.dims.cp

    def stages(self, pp_rank: int) -> list[tuple[int, ...]]:
        """Block indices of each stage pp rank `pp_rank` runs (one stage without pipelining)."""
        if self.pipeline is None:
            return [tuple(range(self.cfg.model.n_layers))]
        return [self.pipeline.stage_layers[s] for s in self.pipeline.stages_of(pp_rank)]

    def representative_ranks(self) -> list[int]:
        """One pp rank per kind of work: the first rank of each group holding the same number of blocks
        per stage and the same ends of the model (earlier ranks of a group keep more micro-batches in
        flight, so they peak higher)."""
        kinds: dict[tuple, int] = {}
        for r in range(self.dims.pp):
            kind = tuple((len(s), 0 in s, self.cfg.model.n_layers - 1 in s) for s in self.stages(r))
            kinds.setdefault(kind, r)
        return sorted(kinds.values())

    def holds_first(self, pp_rank: int) -> bool:
        return self.pipeline is None or 0 in self.pipeline.stages_of(pp_rank)

    def holds_last(self, pp_rank: int) -> bool:
        return self.pipeline is None or self.pipeline.num_stages - 1 in self.pipeline.stages_of(pp_rank)

    @property
    def modelled_microbatches(self) -> int:
        """Micro-batches of the schedule the planner replays: all of them up to 4 x pp, else 4 x pp
        (a schedule's steady state repeats; `extra_microbatches` more add a full rank's work each)."""
        if self.pipeline is None:
            return self.microbatches
        return min(self.microbatches, STEADY_STATE_ROUNDS * self.dims.pp)

    @property
    def extra_microbatches(self) -> int:
        return self.microbatches - self.modelled_microbatches

    def actions(self) -> dict[int, list[tuple[int, str, int]]]:
        """Each pp rank's compute actions in one step of `modelled_microbatches`, (stage, F/B/I/W,
        microbatch); one stage per rank doing forward then backward per micro-batch without pipelining."""
        if self.pipeline is None:
            return {0: [(0, kind, i) for i in range(self.microbatches) for kind in ("F", "B")]}
        p = self.cfg.parallel
        return _actions(p.pp_schedule, self.dims.pp, p.pp_virtual_stages, self.modelled_microbatches)


@cache
def _actions(schedule: str, pp: int, virtual: int, microbatches: int) -> dict[int, list[tuple[int, str, int]]]:
    return schedule_actions(schedule, pp, virtual, microbatches)


def plan_layout(cfg: PretrainConfig, world_size: int, device: str, plan: ModelPlan | None = None) -> PlannedLayout:
    """The layout `cfg.parallel` describes on `world_size` ranks, after the recipe's own checks (a
    `ConfigError` / `LayoutError` naming the key when it is impossible)."""
    p, t = cfg.parallel, cfg.training
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp, p.pp, world_size, p.cp, p.ep)
    validate(cfg, world_size, dims.dp_size)
    check_layout(cfg, dims, torch.device(device), plan)
    local = t.global_batch_size // dims.dp_size
    if dims.pp == 1:
        return PlannedLayout(cfg, dims, None, local // t.micro_batch_size, t.micro_batch_size)
    pipeline = pipeline_layout(cfg, dims.pp)
    n = pipeline_microbatches(cfg, dims, pipeline)
    return PlannedLayout(cfg, dims, pipeline, n, local // n)
