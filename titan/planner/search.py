"""`--search`: every layout the recipe would accept for a model, a cluster and a global batch,
planned, the ones that do not fit dropped, the rest ranked by predicted tokens/s."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

from parallel.errors import LayoutError
from titan.config import ClusterConfig, ConfigError, PretrainConfig
from titan.planner.plan import Plan, make_plan, world_size

AC_MODES = ("none", "op", "selective", "full")
MAX_TP, MAX_PP, MAX_CP, MAX_MICRO_BATCH = 8, 32, 8, 16
MIN_CP_TOKENS = 1024  # context parallelism below this many local tokens only adds traffic


@dataclass(frozen=True)
class SearchResult:
    plans: list[Plan]  # fitting layouts, fastest first
    considered: int  # layouts the recipe accepts
    too_big: int  # of those, layouts that do not fit


def _powers_of_two(limit: int) -> list[int]:
    return [1 << i for i in range(limit.bit_length()) if 1 << i <= limit]


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in _powers_of_two(limit) if n % d == 0]


def candidates(cfg: PretrainConfig, cluster: ClusterConfig) -> Iterator[PretrainConfig]:
    """Layouts over the degrees (powers of two), pipeline schedules, micro-batch sizes and activation
    checkpointing modes; sequence parallelism is on with tp; HSDP replicates over whole nodes."""
    world, t, m = world_size(cluster), cfg.training, cfg.model
    moe = m.moe.n_experts > 0
    for tp in _divisors(world, min(MAX_TP, cluster.devices_per_node)):
        for cp in _divisors(world // tp, MAX_CP):
            if cp > 1 and t.seq_len // cp < MIN_CP_TOKENS:
                continue
            for pp in _divisors(world // (tp * cp), min(MAX_PP, m.n_layers)):
                dp = world // (tp * cp * pp)
                schedules = [("1f1b", 1)] if pp == 1 else [("1f1b", 1), ("interleaved_1f1b", 2), ("interleaved_1f1b", 4)]
                for replicate in _divisors(dp, cluster.nodes):
                    shard = dp // replicate
                    for ep in (_divisors(shard * cp, m.moe.n_experts) if moe else [1]):
                        for schedule, virtual in schedules:
                            if pp * virtual > m.n_layers:
                                continue
                            parallel = dataclasses.replace(
                                cfg.parallel, tp=tp, cp=cp, pp=pp, ep=ep, dp_replicate=replicate, dp_shard=shard,
                                sequence_parallel=tp > 1, pp_schedule=schedule, pp_virtual_stages=virtual,
                                pp_microbatches=None, pp_layers_per_stage=None, hierarchical=False)
                            local = t.global_batch_size // dp if t.global_batch_size % dp == 0 else 0
                            for micro in _divisors(local, MAX_MICRO_BATCH) if local else []:
                                for ac in AC_MODES:
                                    training = dataclasses.replace(t, micro_batch_size=micro, activation_checkpoint=ac)
                                    yield dataclasses.replace(cfg, parallel=parallel, training=training)


def search(cfg: PretrainConfig, cluster: ClusterConfig) -> SearchResult:
    """Plan every candidate; keep those that fit. Activation checkpointing is tried from none to
    full and stops at the first mode that fits (more recomputation is never faster)."""
    fitting, considered, too_big = [], 0, 0
    skip_more_ac: set[tuple] = set()
    for candidate in candidates(cfg, cluster):
        p, t = candidate.parallel, candidate.training
        key = (p.tp, p.cp, p.pp, p.ep, p.dp_replicate, p.pp_schedule, p.pp_virtual_stages, t.micro_batch_size)
        if key in skip_more_ac:
            continue
        try:
            plan = make_plan(candidate, cluster)
        except (ConfigError, LayoutError):
            continue
        considered += 1
        if plan.fits:
            fitting.append(plan)
            skip_more_ac.add(key)
        else:
            too_big += 1
    fitting.sort(key=lambda plan: -plan.time.tokens_per_s)
    return SearchResult(fitting, considered, too_big)
