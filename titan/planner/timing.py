"""Step time of a layout: compute from FLOPs at the cluster's matmul rate, elementwise work from the
activation bytes at its memory bandwidth, a fixed cost per op, each dimension's traffic on the link
its group spans, the pipeline schedule replayed with these costs (`titan.report.replay`: the same
replay `recipes.report` draws), and the optimizer step.

TP, CP and EP traffic waits for the data it carries and adds to the micro-batch's time; FSDP, DP
and PP traffic runs beside compute and shows only where compute cannot cover it (`comm_overlap`)."""

from __future__ import annotations

from dataclasses import dataclass

from parallel.costs import collective_seconds
from titan.config import ClusterConfig, ModelConfig
from titan.models import flops_per_token
from titan.planner.comm import step_traffic
from titan.planner.facts import ModelFacts
from titan.planner.layout import PlannedLayout
from titan.planner.memory import FP32, _unit_shard, block_activations, block_op_saved, checkpointed
from titan.planner.parts import rank_parts
from titan.report import STAGE_COSTS, replay

OPS_PER_BLOCK = {False: 205, True: 380}  # eager ops of one block's forward + backward (dense, MoE; counted in tests/unit/test_planner.py)
OPS_PER_UNIT = 12  # FSDP's copy-in, copy-out and hooks per unit and micro-batch
ELEMENTWISE_PASSES = 5  # elementwise traffic per saved activation byte: written and read in forward, read, written, read in backward
OPTIMIZER_BYTES = 32  # per fp32 parameter element: AdamW reads and writes the parameter and both moments, reads the gradient; clipping
OPTIMIZER_OPS_PER_TENSOR = 12  # the per-tensor (CPU) AdamW and clipping


@dataclass(frozen=True)
class Traffic:
    dim: str
    bytes: float
    seconds: float
    overlapped: bool


@dataclass(frozen=True)
class StepTime:
    compute_s: float  # the busiest pp rank's forward + backward work, without pipeline bubbles
    bubble_s: float  # idle time the pipeline schedule adds
    exposed_comm_s: float  # TP/CP/EP traffic plus the FSDP/DP/PP traffic compute does not hide
    overlapped_comm_s: float  # FSDP/DP/PP traffic hidden behind compute
    optimizer_s: float
    traffic: tuple[Traffic, ...]  # pp rank 0's, per dimension
    step_s: float
    tokens_per_s: float
    mfu: float

    def traffic_by_dim(self) -> dict[str, float]:
        """Bytes per step on each `comm_gb/<dim>` (a dimension may carry several kinds of traffic)."""
        out: dict[str, float] = {}
        for x in self.traffic:
            out[x.dim] = out.get(x.dim, 0.0) + x.bytes
        return out


def block_flops(sparse: bool, m: ModelConfig, seq_len: int) -> tuple[float, float, float]:
    """(matmul flops per token split over tp, attention flops per token split over tp, matmul flops per
    token every tp rank repeats) of one block's forward + backward: 6 x the matmul parameters a token
    uses, attention as a full square (the framework's MFU convention); an MoE layer runs whole on
    every tp rank."""
    head_dim = m.dim // m.n_heads
    projections = 6 * 2 * m.dim * (m.n_heads + m.n_kv_heads) * head_dim
    attention = 12 * m.dim * seq_len
    if not sparse:
        return projections + 18 * m.dim * m.ffn_hidden_dim, attention, 0.0
    e = m.moe
    return projections, attention, 6 * (m.dim * e.n_experts + 3 * m.dim * e.hidden_dim * (e.top_k + e.n_shared_experts))


def link(group: str, layout: PlannedLayout, cluster: ClusterConfig) -> tuple[float, float]:
    """(GB/s, latency us) of the link a dimension's group spans: ranks are placed tp fastest, then
    cp, dp_shard, dp_replicate, pp (the mesh order); a group inside one node uses the node's links."""
    d = layout.dims
    stride_size = {"tp": (1, d.tp), "cp": (d.tp, d.cp), "fsdp": (d.tp, d.dp_shard * d.cp), "ep": (d.tp, d.ep),
                   "expert_shard": (d.tp * d.ep, d.expert_shard),
                   "dp_replicate": (d.tp * d.cp * d.dp_shard, d.dp_replicate),
                   "pp": (d.tp * d.cp * d.dp_shard * d.dp_replicate, d.pp)}[group]
    inside = stride_size[0] * stride_size[1] <= cluster.devices_per_node
    if inside:
        return cluster.intra_node_gbps, cluster.intra_node_latency_us
    return cluster.inter_node_gbps, cluster.inter_node_latency_us


_MAKESPANS: dict[tuple, float] = {}


def _makespan(layout: PlannedLayout) -> float:
    """One step of the pipeline schedule replayed with the nominal stage costs (F 1, B 2: a backward
    does twice a forward's matmuls), in those units."""
    p = layout.cfg.parallel
    key = (p.pp_schedule, layout.dims.pp, p.pp_virtual_stages, layout.modelled_microbatches)
    if key not in _MAKESPANS:
        _MAKESPANS[key] = max(a[4] for rank in replay(layout.actions(), layout.pipeline.num_stages) for a in rank)
    per_microbatch = p.pp_virtual_stages * (STAGE_COSTS["F"] + STAGE_COSTS["B"])
    return _MAKESPANS[key] + layout.extra_microbatches * per_microbatch


def predict_time(facts: ModelFacts, layout: PlannedLayout, cluster: ClusterConfig) -> StepTime:
    cfg, dims = layout.cfg, layout.dims
    m, t = cfg.model, cfg.training
    bf16 = t.dtype == "bfloat16"
    act = 2 if bf16 else FP32
    rate = (cluster.matmul_tflops_bf16 if bf16 else cluster.matmul_tflops_fp32) * 1e12
    overhead = cluster.kernel_overhead_us * 1e-6
    tokens = layout.local_tokens
    sp = cfg.parallel.sequence_parallel and dims.tp > 1

    per_rank = []
    for r in layout.representative_ranks():
        parts = rank_parts(facts, layout, r)
        flops = attention = acts = ops = 0.0
        cost = {sparse: block_flops(sparse, m, t.seq_len) for sparse in (False, True)}
        whole = {sparse: block_activations(sparse, m, tokens, dims.tp, sp, dims.cp, act) for sparse in (False, True)}
        kept = {sparse: block_op_saved(sparse, m, tokens, dims.tp, sp, act) for sparse in (False, True)}
        for stage in parts.stages:
            for position, block in enumerate(stage.blocks):
                split, square, repeated = cost[block.sparse]
                recompute = 4 / 3 if checkpointed(t, position) else 1.0
                flops += tokens * (split / dims.tp + repeated) * recompute
                attention += tokens * square / dims.tp * recompute
                acts += whole[block.sparse] * recompute
                ops += OPS_PER_BLOCK[block.sparse] * recompute
                if t.activation_checkpoint == "op":  # backward re-runs every op but the matmuls and attention
                    acts += max(0.0, whole[block.sparse] - kept[block.sparse])
                    ops += OPS_PER_BLOCK[block.sparse]
            if stage.last:
                flops += tokens * 6 * m.dim * m.vocab_size / dims.tp
        dtensor_ops = ops if dims.tp > 1 else 0.0
        ops += OPS_PER_UNIT * sum(c for _, _, c in parts.units) if dims.fsdp_size > 1 else 0
        traffic = step_traffic(facts, layout, r, cluster.device)
        blocking = sum(collective_seconds(x.bytes, x.collectives, *link(x.group, layout, cluster))
                       for x in traffic if not x.overlapped) / layout.microbatches
        work = (flops + attention / cluster.attention_efficiency) / rate
        work += ELEMENTWISE_PASSES * acts / (cluster.memory_gbps * 1e9)
        fixed = ops * overhead + dtensor_ops * cluster.dtensor_op_overhead_us * 1e-6
        work = work + fixed if cluster.device == "cpu" else max(work, fixed)
        per_rank.append((work + blocking, blocking, traffic))

    micro_s = max(x[0] for x in per_rank)  # one micro-batch through the busiest rank's stages
    compute = layout.microbatches * micro_s
    if layout.pipeline is None:
        pipelined = compute
    else:
        stage_s = micro_s / cfg.parallel.pp_virtual_stages
        pipelined = _makespan(layout) * stage_s / (STAGE_COSTS["F"] + STAGE_COSTS["B"])

    timed = [Traffic(x.dim, x.bytes, collective_seconds(x.bytes, x.collectives, *link(x.group, layout, cluster)),
                     x.overlapped) for x in per_rank[0][2]]
    overlappable = max(sum(collective_seconds(x.bytes, x.collectives, *link(x.group, layout, cluster))
                           for x in traffic if x.overlapped) for _, _, traffic in per_rank)
    hidden = min(overlappable, cluster.comm_overlap * (compute - layout.microbatches * max(x[1] for x in per_rank)))
    exposed = overlappable - hidden + layout.microbatches * max(x[1] for x in per_rank)

    optimizer = 0.0
    shards = (dims.dp_shard * dims.cp, dims.expert_shard) if dims.fsdp_size > 1 else (1, 1)
    for r in layout.representative_ranks():
        units = rank_parts(facts, layout, r).units
        elements = sum(c * _unit_shard(u, dims.tp, dims.ep, shards[e]) for u, e, c in units)
        tensors = sum(c * len(u) for u, _, c in units)
        per_tensor = OPTIMIZER_OPS_PER_TENSOR * tensors * overhead if cluster.device == "cpu" else 0.0
        optimizer = max(optimizer, OPTIMIZER_BYTES * elements / (cluster.memory_gbps * 1e9) + per_tensor)

    step = pipelined + overlappable - hidden + optimizer
    tokens_per_s = t.global_batch_size * t.seq_len / step
    peak = cluster.peak_tflops_bf16 if bf16 else cluster.peak_tflops_fp32
    mfu = flops_per_token(m, t.seq_len) * tokens_per_s / dims.world_size / (peak * 1e12)
    return StepTime(compute, pipelined - compute, exposed, hidden, optimizer, tuple(timed), step, tokens_per_s, mfu)
