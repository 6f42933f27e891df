"""Pipeline parallelism on `torch.distributed.pipelining`: cut the model into stages, place them on
pp ranks, and build the schedule.

The model is cut into ``pp x pp_virtual_stages`` stages of consecutive blocks. The first stage also
owns the embedding, the last the final norm and output projection; an automatic split balances
estimated FLOPs (blocks, plus the output projection on the last stage), and an explicit
layers-per-stage list overrides it. Stage ``s`` runs on pp rank ``s mod pp`` (looped/interleaved),
or on the V-shaped order ``0 1 .. p-1 p-1 .. 1 0`` for the V schedules. Each stage is a copy of the
model with the other blocks removed, so parameter names stay the global ones.
"""

from __future__ import annotations

import copy
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache, partial
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)
from torch.distributed.pipelining.schedules import (OVERLAP_F_B, PipelineScheduleMulti, PipelineScheduleSingle,
                                                   _PipelineSchedule)

from parallel.errors import LayoutError
from parallel.plan import ModelPlan

SCHEDULES: dict[str, type[_PipelineSchedule]] = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "interleaved_zb": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
    "dualpipev": ScheduleDualPipeV,
}
V_SHAPED = ("zbv", "dualpipev")


@dataclass(frozen=True)
class PipelineLayout:
    """Which blocks each stage holds and which pp rank runs it."""

    stage_layers: tuple[tuple[int, ...], ...]  # block indices per stage, in order
    stage_ranks: tuple[int, ...]

    @property
    def num_stages(self) -> int:
        return len(self.stage_layers)

    def stages_of(self, pp_rank: int) -> list[int]:
        return [s for s, r in enumerate(self.stage_ranks) if r == pp_rank]

    @property
    def last_stage_rank(self) -> int:
        return self.stage_ranks[-1]


def check_schedule(schedule: str, pp: int, virtual: int) -> None:
    if schedule not in SCHEDULES:
        raise LayoutError("parallel.pp_schedule", f"unknown schedule {schedule!r}.", f"use one of {', '.join(SCHEDULES)}.")
    multi = issubclass(SCHEDULES[schedule], PipelineScheduleMulti)
    if virtual < 1:
        raise LayoutError("parallel.pp_virtual_stages", f"must be >= 1, got {virtual}.", "set it to 1 or more.")
    if not multi and virtual != 1:
        raise LayoutError("parallel.pp_virtual_stages", f"{schedule} runs one stage per rank, got {virtual}.",
                          "set parallel.pp_virtual_stages=1, or pick interleaved_1f1b / interleaved_zb.")
    if schedule in V_SHAPED and virtual != 2:
        raise LayoutError("parallel.pp_virtual_stages", f"{schedule} places exactly 2 stages per rank in a V, got {virtual}.",
                          "set parallel.pp_virtual_stages=2.")
    if multi and schedule not in V_SHAPED and virtual < 2:
        raise LayoutError("parallel.pp_virtual_stages", f"{schedule} interleaves several stages per rank.",
                          "set parallel.pp_virtual_stages=2 or more, or use 1f1b / gpipe.")


def balanced_split(costs: list[float], num_stages: int, first_extra: float, last_extra: float) -> list[int]:
    """Layers per stage (each >= 1) minimizing the most expensive stage; contiguous blocks."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: minimal max-cost of putting the first i layers on the first s stages.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        extra = (first_extra if s == 1 else 0.0) + (last_extra if s == num_stages else 0.0)
        for i in range(s, n - (num_stages - s) + 1):
            for j in range(s - 1, i):
                cost = max(best[s - 1][j], prefix[i] - prefix[j] + extra)
                if cost < best[s][i]:
                    best[s][i], cut[s][i] = cost, j
    sizes, i = [], n
    for s in range(num_stages, 0, -1):
        j = cut[s][i]
        sizes.append(i - j)
        i = j
    return sizes[::-1]


@cache
def plan_stages(n_layers: int, pp: int, virtual: int, schedule: str, layer_cost: float, first_cost: float,
                last_cost: float, layers_per_stage: tuple[int, ...] | None) -> PipelineLayout:
    """Cut `n_layers` blocks into `pp x virtual` stages and place them on pp ranks (cached: the
    planner's search asks for the same cuts many times)."""
    check_schedule(schedule, pp, virtual)
    num_stages = pp * virtual
    if num_stages > n_layers:
        raise LayoutError("parallel.pp", f"{num_stages} stages (pp={pp} x pp_virtual_stages={virtual}) exceed the "
                          f"{n_layers} layers.", "lower parallel.pp or parallel.pp_virtual_stages, or add layers.")
    if layers_per_stage:
        sizes = list(layers_per_stage)
        if len(sizes) != num_stages or sum(sizes) != n_layers or min(sizes) < 1:
            raise LayoutError("parallel.pp_layers_per_stage",
                              f"{sizes} must list {num_stages} positive sizes summing to {n_layers}.",
                              "fix the list or leave it empty for an automatic split.")
    else:
        sizes = balanced_split([layer_cost] * n_layers, num_stages, first_cost, last_cost)
    bounds = [sum(sizes[:s]) for s in range(num_stages + 1)]
    layers = tuple(tuple(range(bounds[s], bounds[s + 1])) for s in range(num_stages))
    if schedule in V_SHAPED:
        ranks = tuple(s if s < pp else 2 * pp - 1 - s for s in range(num_stages))
    else:
        ranks = tuple(s % pp for s in range(num_stages))
    return PipelineLayout(layers, ranks)


def stage_module(model: nn.Module, plan: ModelPlan, layout: PipelineLayout, stage: int) -> nn.Module:
    """A copy of `model` (on meta) holding only this stage's blocks, and the embedding / final norm /
    output only on the first / last stage."""
    part = copy.deepcopy(model)
    keep = {str(i) for i in layout.stage_layers[stage]}
    blocks: nn.ModuleDict = part.get_submodule(plan.blocks)
    for key in [k for k in blocks if k not in keep]:
        del blocks[key]
    if stage != 0:
        setattr(part, plan.embedding, None)
    if stage != layout.num_stages - 1:
        setattr(part, plan.final_norm, None)
        setattr(part, plan.output, None)
    return part


_SHAPE_INFERENCE: ContextVar[bool] = ContextVar("pipeline_shape_inference", default=False)
SHAPE_INFERENCE_METHODS = ("_forward_metadata_inference", "_shape_inference")  # torch 2.13, earlier


def in_shape_inference() -> bool:
    """Whether the forward running now is a pipeline stage's shape inference: a pass over placeholder
    inputs before the first step, whose side effects (e.g. routing statistics) must not count."""
    return _SHAPE_INFERENCE.get()


def _flag_shape_inference(stage: PipelineStage) -> None:
    for name in SHAPE_INFERENCE_METHODS:
        original = getattr(stage, name, None)
        if original is not None:
            setattr(stage, name, partial(_while_inferring, original))


def _while_inferring(original: Callable, *args, **kwargs):
    token = _SHAPE_INFERENCE.set(True)
    try:
        return original(*args, **kwargs)
    finally:
        _SHAPE_INFERENCE.reset(token)


def build_schedule(schedule: str, stages: list[PipelineStage], n_microbatches: int,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> _PipelineSchedule:
    """The torch schedule; gradients are not rescaled (the loss function already normalizes). The
    stages' shape inference is flagged (`in_shape_inference`)."""
    for stage in stages:
        _flag_shape_inference(stage)
    cls = SCHEDULES[schedule]
    try:
        if issubclass(cls, PipelineScheduleSingle):
            return cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
        return cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    except ValueError as exc:
        raise LayoutError("parallel.pp_microbatches", f"{schedule} cannot run {n_microbatches} microbatches: {exc}",
                          "choose a number of microbatches the schedule supports (e.g. a multiple of parallel.pp), "
                          "via training.micro_batch_size or parallel.pp_microbatches.") from exc


def schedule_actions(schedule: str, pp: int, virtual: int,
                     n_microbatches: int) -> dict[int, list[tuple[int, str, int]]]:
    """Per pp rank, the compute actions of one step of `schedule`, in the order the rank runs them:
    (stage, kind, microbatch), kind F (forward), B (full backward), I (input-gradient backward) or
    W (weight-gradient backward). Needs no process group and no model."""
    check_schedule(schedule, pp, virtual)
    cls, m = SCHEDULES[schedule], n_microbatches
    try:
        # The one-stage schedules: the order their `_step_microbatches` runs (their `pipeline_order`
        # is a drawing aid of torch's that differs from it).
        if cls is ScheduleGPipe:
            return {r: [(r, "F", i) for i in range(m)] + [(r, "B", i) for i in range(m)] for r in range(pp)}
        if cls is Schedule1F1B:
            if m < pp:
                raise ValueError(f"1F1B needs at least as many microbatches as stages ({pp})")
            return {r: _one_f_one_b(r, pp, m) for r in range(pp)}
        # The multi-stage schedules compute their order for every rank when built; these stand-ins
        # hold all the stage facts their constructors read.
        stages = [SimpleNamespace(num_stages=pp * virtual, group_size=pp, group_rank=0, submod=None)] * virtual
        order = cls(stages, n_microbatches=m, loss_fn=None, scale_grads=False).pipeline_order
    except ValueError as exc:
        raise LayoutError("parallel.pp_microbatches", f"{schedule} cannot run {m} microbatches: {exc}",
                          "choose a number of microbatches the schedule supports (e.g. a multiple of "
                          "parallel.pp).") from exc
    actions = {}
    for rank, row in order.items():
        leaves = [sub for a in row if a is not None
                  for sub in (a.sub_actions if a.computation_type == OVERLAP_F_B else (a,))]
        actions[rank] = [(a.stage_index, a.computation_type.value, a.microbatch_index) for a in leaves
                         if a.computation_type.value in ("F", "B", "I", "W")]
    return actions


def _one_f_one_b(rank: int, pp: int, m: int) -> list[tuple[int, str, int]]:
    """Rank `rank` of 1F1B: forwards until pp - rank are in flight, then a backward and a forward in
    turn, then the remaining backwards."""
    warmup = min(m, pp - rank)
    order = [(rank, "F", i) for i in range(warmup)]
    for i in range(m):
        order.append((rank, "B", i))
        if warmup + i < m:
            order.append((rank, "F", warmup + i))
    return order


class StageUnion(nn.Module):
    """This rank's stages seen as one module whose parameter names are the global ones
    (`layers.<i>...`, `tok_embeddings...`), for the optimizer, clipping and checkpoints. It
    shares the stages' modules; it is not called."""

    def __init__(self, parts: list[nn.Module], plan: ModelPlan):
        super().__init__()
        blocks = nn.ModuleDict()
        for part in parts:
            blocks.update(part.get_submodule(plan.blocks))
        setattr(self, plan.blocks, blocks)
        for name in (plan.embedding, plan.final_norm, plan.output):
            owned = [getattr(part, name) for part in parts if getattr(part, name) is not None]
            if owned:
                setattr(self, name, owned[0])

    def forward(self, *args, **kwargs):
        raise RuntimeError("pipeline stages run through their schedule, not through StageUnion")


class SideInputs:
    """Keyword inputs that go beside a pipeline's activations, one set per microbatch (e.g. token
    positions and document ids, which every stage's attention needs but only the first stage's inputs
    carry). `load` sets a step's sets; a stage's forward of microbatch `i` gets set `i` (the stage's
    `forward_one_chunk` says which microbatch runs). A forward outside a microbatch (the stage's
    shape inference) gets set 0, or meta copies of it for meta inputs."""

    def __init__(self, stages: list[PipelineStage]):
        self.per_microbatch: list[dict[str, Any]] = []
        for stage in stages:
            running = {"chunk": 0}
            stage.forward_one_chunk = partial(self._forward_one_chunk, stage.forward_one_chunk, running)
            stage.submod.register_forward_pre_hook(partial(self._inject, running), with_kwargs=True)

    def load(self, per_microbatch: list[dict[str, Any]]) -> None:
        self.per_microbatch = per_microbatch

    @staticmethod
    def _forward_one_chunk(original: Callable, running: dict, fwd_chunk_id: int, *args, **kwargs):
        running["chunk"] = fwd_chunk_id
        return original(fwd_chunk_id, *args, **kwargs)

    def _inject(self, running: dict, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self.per_microbatch:
            return None
        extra = self.per_microbatch[running["chunk"]]
        if args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            extra = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
        return args, {**kwargs, **extra}
