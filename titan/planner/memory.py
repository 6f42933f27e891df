"""Peak memory of each pp rank: parameter, gradient and AdamW shards, the activations autograd saves
for every micro-batch in flight, the loss's logits, and FSDP's unsharded units, at the two moments
a step may peak (the start of a backward, the end of the step's last backward, the optimizer step).

Activations are counted per token from what the model's ops save for backward (checked against a
traced block in `tests/unit/test_planner.py`): per block, each norm keeps its input, its normalized
output (on the residual stream: split along the sequence under sequence parallelism) and 1/rms, and
its output gathered whole for the linears; attention keeps q, its output, k and v (gathered over the
cp ranks) and one log-sum-exp per head; the SwiGLU keeps four hidden-wide tensors; an MoE layer keeps
each routed copy's input and output and four expert-hidden tensors, the shared experts' four, and
the router's scores. Tensor parallelism splits heads and hidden widths. Activation checkpointing
keeps only a checkpointed block's input and recomputes the block during its backward; by operator
(`op`), every block keeps its input and its matmul and attention outputs and recomputes the rest."""

from __future__ import annotations

from dataclasses import dataclass
from titan.config import ClusterConfig, ModelConfig, TrainingConfig
from titan.planner.facts import ModelFacts, Unit, unit_elements
from titan.planner.layout import PlannedLayout
from titan.planner.parts import rank_parts

FP32 = 4
ADAM_MOMENTS = 2


@dataclass(frozen=True)
class RankMemory:
    """Bytes on one rank of pp rank `pp_rank` at its peak, by what holds them."""

    pp_rank: int
    params: float  # fp32 parameter shards
    grads: float  # fp32 gradient shards (present at the peak, see `phase`)
    optimizer: float  # AdamW moments (Muon's momentum for its matrices under optim=muon)
    activations: float  # saved for backward, all micro-batches in flight
    transient: float  # logits and their gradients in the loss backward, or a block being recomputed, or the optimizer's temporaries
    gathered: float  # FSDP: unsharded units kept or prefetched, gradient and reduce-scatter buffers
    buffers: float  # rotary tables and other buffers
    runtime: float  # outside tensors: CUDA context / process (cluster.runtime_memory_gb)
    phase: str  # backward | backward end | optimizer: when the peak happens

    @property
    def peak(self) -> float:
        return (self.params + self.grads + self.optimizer + self.activations + self.transient + self.gathered
                + self.buffers + self.runtime)


def block_activations(sparse: bool, m: ModelConfig, tokens: int, tp: int, sp: bool, cp: int, act: int) -> float:
    """Bytes one block saves for backward for `tokens` local tokens (activation dtype `act` bytes)."""
    d, head_dim = m.dim, m.dim // m.n_heads
    kv = m.n_kv_heads * head_dim
    seq_split = tp if sp else 1
    norms = 2 * tokens * ((2 * d * act + FP32) / seq_split + d * act)
    attention = tokens * ((2 * d + 2 * kv * cp) * act + FP32 * m.n_heads) / tp
    if not sparse:
        return norms + attention + tokens * 4 * m.ffn_hidden_dim * act / tp
    e = m.moe
    routed = tokens * e.top_k * (2 * d + 4 * e.hidden_dim) * act
    shared = tokens * 4 * e.n_shared_experts * e.hidden_dim * act
    router = tokens * (3 * e.n_experts * FP32 + (d * FP32 if act != FP32 else 0))
    return norms + attention + routed + shared + router


def block_op_saved(sparse: bool, m: ModelConfig, tokens: int, tp: int, sp: bool, act: int) -> float:
    """Bytes a block keeps under `activation_checkpoint=op`: its input (for the recompute) and the
    outputs of its matmuls and attention: q, k, v (local, before any cp gather), the attention output
    and its log-sum-exp, the output projection's, and w1, w3, w2's (per routed copy and shared expert
    in an MoE layer, plus the router's fp32 logits)."""
    d, head_dim = m.dim, m.dim // m.n_heads
    kv = m.n_kv_heads * head_dim
    kept_input = d * act / (tp if sp else 1)
    attention = (2 * d + 2 * kv) * act / tp + FP32 * m.n_heads / tp + d * act
    if not sparse:
        return tokens * (kept_input + attention + (2 * m.ffn_hidden_dim / tp + d) * act)
    e = m.moe
    experts = (e.top_k + e.n_shared_experts) * (2 * e.hidden_dim + d) * act
    return tokens * (kept_input + attention + experts + e.n_experts * FP32)


def block_backward_transient(sparse: bool, m: ModelConfig, tokens: int, tp: int, act: int) -> float:
    """Gradients a block's backward holds at its largest moment, the SwiGLU's: the gradients of its
    product and of both hidden-wide inputs (per routed copy and shared expert in an MoE layer)."""
    if not sparse:
        return 3 * tokens * m.ffn_hidden_dim * act / tp
    e = m.moe
    return 3 * tokens * (e.top_k + e.n_shared_experts) * e.hidden_dim * act


def head_activations(m: ModelConfig, tokens: int, tp: int, sp: bool, act: int) -> float:
    """The final norm's saved tensors (as a block's norm)."""
    return tokens * ((2 * m.dim * act + FP32) / (tp if sp else 1) + m.dim * act)


def loss_bytes(m: ModelConfig, tokens: int, tp: int, loss_parallel: bool) -> tuple[float, float]:
    """(saved, peak in its backward): cross-entropy keeps fp32 log-probabilities of the (vocabulary-
    sharded under loss parallelism) logits; its backward adds their gradient and the logits'."""
    vocab = m.vocab_size // tp if tp > 1 and loss_parallel else m.vocab_size
    saved = tokens * vocab * FP32
    return saved, 3 * saved


_SHARDS: dict[tuple[int, int, int, int], int] = {}


def _largest_param(unit: Unit, tp: int, ep: int, shards: int) -> int:
    key = (id(unit), tp, ep, -shards)
    if key not in _SHARDS:
        _SHARDS[key] = max(p.elements(tp, ep, shards) for p in unit)
    return _SHARDS[key]


def _unit_shard(unit: Unit, tp: int, ep: int, shards: int) -> int:
    """`unit_elements`, remembered by the unit's identity (`model_facts` shares one tuple between
    equal units, and keeps them alive)."""
    key = (id(unit), tp, ep, shards)
    if key not in _SHARDS:
        _SHARDS[key] = unit_elements(unit, tp, ep, shards)
    return _SHARDS[key]


def predict_memory(facts: ModelFacts, layout: PlannedLayout, cluster: ClusterConfig) -> list[RankMemory]:
    """The peak of each representative pp rank (`PlannedLayout.representative_ranks`; the ranks of
    one pp rank hold the same amounts)."""
    return [_rank_memory(facts, layout, cluster, r) for r in layout.representative_ranks()]


def _rank_memory(facts: ModelFacts, layout: PlannedLayout, cluster: ClusterConfig, pp_rank: int) -> RankMemory:
    cfg, dims = layout.cfg, layout.dims
    m, t, p = cfg.model, cfg.training, cfg.parallel
    bf16 = t.dtype == "bfloat16"
    act = 2 if bf16 else FP32
    fsdp = dims.fsdp_size > 1
    gathered_bytes = 2 if bf16 and fsdp else FP32
    tp, ep = dims.tp, dims.ep
    sp = p.sequence_parallel and tp > 1
    parts = rank_parts(facts, layout, pp_rank)
    shards = (dims.dp_shard * dims.cp, dims.expert_shard) if fsdp else (1, 1)

    params = FP32 * sum(n * _unit_shard(u, tp, ep, shards[e]) for u, e, n in parts.units)
    optimizer = ADAM_MOMENTS * params
    if cfg.optim.name == "muon":  # Muon keeps one moment (its momentum) where AdamW keeps two
        optimizer -= FP32 * sum(n * sum(q.elements(tp, ep, shards[e]) for q in u if q.muon) for u, e, n in parts.units)
    largest = max(_largest_param(u, tp, ep, shards[e]) for u, e, _ in parts.units)
    # foreach AdamW makes whole-list temporaries; the fused kernel (the default) and the per-tensor loop
    # at most two of the largest tensor
    opt_temp = FP32 * (params / FP32 if cfg.optim.implementation == "foreach" else 2 * largest)

    tokens = layout.local_tokens
    whole = {sparse: block_activations(sparse, m, tokens, tp, sp, dims.cp, act) for sparse in (False, True)}
    op_kept = {sparse: block_op_saved(sparse, m, tokens, tp, sp, act) for sparse in (False, True)}
    kept_input = tokens * m.dim * act / (tp if sp else 1)
    saved_loss, loss_peak = loss_bytes(m, tokens, tp, p.loss_parallel)
    stage_acts, backward_extra = [], []
    for stage in parts.stages:
        saved, recompute, gradients = 0.0, 0.0, 0.0
        for position, block in enumerate(stage.blocks):
            gradients = max(gradients, block_backward_transient(block.sparse, m, tokens, tp, act))
            if t.activation_checkpoint == "op":
                saved += op_kept[block.sparse]
                recompute = max(recompute, max(0.0, whole[block.sparse] - op_kept[block.sparse]))
            elif checkpointed(t, position):
                saved += kept_input
                recompute = max(recompute, whole[block.sparse])
            else:
                saved += whole[block.sparse]
        if cfg.data.document_mask:
            saved += tokens * t.seq_len * act  # one additive mask shared by the layers
        if stage.first:
            saved += tokens * 8  # token ids
        if stage.last:
            # The loss backward first; the blocks' after the head's and the loss's saved tensors are freed.
            head = head_activations(m, tokens, tp, sp, act) + saved_loss
            saved += head
            backward_extra.append(max(loss_peak - saved_loss, recompute, gradients - head))
        else:
            saved += tokens * m.dim * act / (tp if sp else 1)  # the stage's output, kept by the schedule for its backward
            backward_extra.append(max(recompute, gradients))
        stage_acts.append(saved)
    in_flight, transient, grads_present = _activation_peak(layout, pp_rank, stage_acts, backward_extra, params)

    gathered = 0.0
    if fsdp:
        kept = parts.units if p.reshard_after_forward is False else parts.kept
        gathered = gathered_bytes * sum(n * _unit_shard(u, tp, ep, 1) for u, _, n in kept)
        if not isinstance(p.reshard_after_forward, bool):
            k = int(p.reshard_after_forward)
            gathered += gathered_bytes * sum(n * _unit_shard(u, tp, ep, k) for u, _, n in parts.regathered())
        largest_unit = max(_unit_shard(u, tp, ep, 1) for u, _, _ in parts.units)
        gathered += 2 * FP32 * largest_unit  # gradient + reduce-scatter buffer
        gathered += gathered_bytes * max(0, p.fsdp_prefetch - 1) * largest_unit  # units gathered further ahead

    # The end of the step's last backward: every gradient shard exists, and FSDP holds the last unit it
    # reduces (the first in forward order) unsharded with its full gradient and reduce-scatter input.
    last_reduced = (gathered_bytes + 2 * FP32) * _unit_shard(parts.units[0][0], tp, ep, 1) if fsdp else 0.0
    common = dict(pp_rank=pp_rank, params=params, optimizer=optimizer, buffers=facts.buffer_bytes,
                  runtime=cluster.runtime_memory_gb * 1e9)
    moments = (RankMemory(grads=grads_present, activations=in_flight, transient=transient, gathered=gathered,
                          phase="backward", **common),
               RankMemory(grads=params, activations=0.0, transient=0.0, gathered=last_reduced,
                          phase="backward end", **common),
               RankMemory(grads=params, activations=0.0, transient=opt_temp, gathered=0.0, phase="optimizer", **common))
    return max(moments, key=lambda r: r.peak)


def checkpointed(t: TrainingConfig, position: int) -> bool:
    """Whether activation checkpointing wraps the block at `position` in its stage."""
    ac = t.activation_checkpoint
    return ac == "full" or (ac == "selective" and position % t.activation_checkpoint_every == 0)


def _activation_peak(layout: PlannedLayout, pp_rank: int, stage_acts: list[float], backward_extra: list[float],
                     grads: float) -> tuple[float, float, float]:
    """(saved activations, transient bytes, gradient bytes) at the largest moment of the rank's
    schedule: each forward adds its stage's activations, each backward frees them and adds its
    stage's transient (`backward_extra`: the loss backward, a recomputed block or a block's gradients);
    gradients exist once the first backward of the step has run (they accumulate over micro-batches)."""
    best = (0.0, 0.0, 0.0)
    for live, stage, grads_present in _moments(layout, pp_rank):
        saved = sum(n * a for n, a in zip(live, stage_acts))
        extra = backward_extra[stage] if stage is not None else 0.0
        best = max(best, (saved, extra, grads if grads_present else 0.0), key=sum)
    return best


def _moments(layout: PlannedLayout, pp_rank: int) -> set[tuple[tuple[int, ...], int | None, bool]]:
    """The distinct moments of a rank's schedule that may peak: (micro-batches in flight per local
    stage, the local stage whose backward runs or None, gradients exist)."""
    p = layout.cfg.parallel
    key = (p.pp_schedule, layout.dims.pp, p.pp_virtual_stages, layout.modelled_microbatches, layout.pipeline is None,
           pp_rank)
    if key not in _MOMENTS:
        local = {stage: i for i, stage in enumerate(layout.pipeline.stages_of(pp_rank))} if layout.pipeline else {0: 0}
        live, moments, any_backward = [0] * len(local), set(), False
        for stage, kind, _ in layout.actions()[pp_rank]:
            if kind == "F":
                live[local[stage]] += 1
                moments.add((tuple(live), None, any_backward))
            elif kind in ("B", "I"):
                moments.add((tuple(live), local[stage], any_backward))
                any_backward = True
            if kind in ("B", "W"):
                live[local[stage]] -= 1
        _MOMENTS[key] = moments
    return _MOMENTS[key]


_MOMENTS: dict[tuple, set[tuple[tuple[int, ...], int | None, bool]]] = {}
