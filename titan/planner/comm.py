"""Bytes and collectives per step on each mesh dimension for one pp rank, named as `comm_gb/<dim>`
names them (`parallel.comm_stats`: a group is named by the innermost dimension with the same
ranks), from the closed forms in `parallel.costs` and the FSDP units of `titan.planner.facts`."""

from __future__ import annotations

from dataclasses import dataclass

from parallel.costs import cp_bytes, ep_bytes, fsdp_bytes, replicate_bytes, tp_bytes
from parallel.replica_reduction import reduces_replicas_itself
from titan.planner.facts import ModelFacts
from titan.planner.layout import PlannedLayout
from titan.planner.memory import FP32, _unit_shard
from titan.planner.parts import rank_parts


@dataclass(frozen=True)
class DimTraffic:
    """One mesh dimension's traffic in one step on one rank."""

    dim: str  # as comm_gb/<dim> names it
    group: str  # which degree's ranks form the group (for its link): tp, cp, ep, fsdp, expert_shard, dp_replicate, pp
    bytes: float
    collectives: float
    overlapped: bool  # FSDP / DP / PP traffic runs beside compute; TP, CP and EP traffic waits for it


def fsdp_dim(dp_shard: int, cp: int) -> str:
    """The name `comm_stats` gives the FSDP group over dp_shard x cp ranks."""
    if cp == 1:
        return "dp_shard"
    return "cp" if dp_shard == 1 else "dp_shard_cp"


def step_traffic(facts: ModelFacts, layout: PlannedLayout, pp_rank: int, device: str) -> list[DimTraffic]:
    """Every dimension's bytes in one optimizer step on a rank of pp rank `pp_rank` of a `device` cluster."""
    cfg, dims = layout.cfg, layout.dims
    p, m, t = cfg.parallel, cfg.model, cfg.training
    act = 2 if t.dtype == "bfloat16" else FP32
    gathered = 2 if t.dtype == "bfloat16" and dims.fsdp_size > 1 else FP32
    micro, tokens = layout.microbatches, layout.local_tokens
    parts = rank_parts(facts, layout, pp_rank)
    blocks = parts.blocks
    sparse = sum(b.sparse for b in blocks)
    first, last = any(s.first for s in parts.stages), any(s.last for s in parts.stages)
    out: list[DimTraffic] = []

    def add(dim: str, group: str, nbytes: float, collectives: float, overlapped: bool) -> None:
        if nbytes > 0:
            out.append(DimTraffic(dim, group, nbytes, collectives, overlapped))

    if dims.tp > 1:
        x = tokens * m.dim * act
        add("tp", "tp", micro * tp_bytes(x, dims.tp, len(blocks) - sparse, sparse, p.sequence_parallel, first, last),
            micro * (8 * len(blocks) + 2 * (first + last)), False)
    if dims.cp > 1:
        kv = m.n_kv_heads * (m.dim // m.n_heads) // dims.tp
        documents = tokens if cfg.data.document_mask else 0
        add("cp", "cp", micro * cp_bytes(2 * tokens * kv * act, len(blocks), dims.cp, documents),
            micro * 4 * len(blocks), False)
    if dims.ep > 1:
        routed = tokens * m.moe.top_k * m.dim * act
        add("ep", "ep", micro * ep_bytes(routed, dims.ep, sparse), micro * 6 * sparse, False)
    if dims.fsdp_size > 1:
        n, k, tp, ep = dims.dp_shard * dims.cp, dims.expert_shard, dims.tp, dims.ep
        reshard = p.reshard_after_forward

        def total(units: list, experts: bool, shards: int) -> float:
            """Elements of these units' shards over `shards` ranks."""
            return sum(c * _unit_shard(u, tp, ep, shards) for u, e, c in units if e == experts)

        regathered = parts.regathered()
        units_count = sum(c for _, e, c in parts.units if not e)
        main, secondary = fsdp_bytes(gathered * total(parts.units, False, n), gathered * total(regathered, False, n),
                                     n, reshard, gathered * total(regathered, False, reshard)
                                     if not isinstance(reshard, bool) else 0.0)
        main += (n - 1) * (FP32 - gathered) * total(parts.units, False, n)  # gradients reduce in fp32
        add(fsdp_dim(dims.dp_shard, dims.cp), "fsdp", micro * main, micro * 3 * units_count, True)
        add("other", "fsdp", micro * secondary, micro * units_count, True)
        expert_units = sum(c for _, e, c in parts.units if e)
        if expert_units:
            e_main, _ = fsdp_bytes(gathered * total(parts.units, True, k), gathered * total(regathered, True, k), k,
                                   reshard is not False)
            e_main += (k - 1) * (FP32 - gathered) * total(parts.units, True, k)
            add("expert_shard", "expert_shard", micro * e_main, micro * 3 * expert_units, True)
        if dims.dp_replicate > 1:  # FSDP's reduction runs every micro-batch, ours once a step
            grads = FP32 * (total(parts.units, False, n) + total(parts.units, True, k))
            reductions = 1 if reduces_replicas_itself(dims, device) else micro
            add("dp_replicate", "dp_replicate", reductions * replicate_bytes(grads, dims.dp_replicate),
                reductions * (units_count + expert_units), True)
    if dims.pp > 1:
        x = tokens * m.dim * act
        boundaries = sum((not s.first) + (not s.last) for s in parts.stages)
        add("pp", "pp", micro * boundaries * x, micro * boundaries * 2, True)
    return out
