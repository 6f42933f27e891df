"""Apply parallelism to a plain model from outside, in one order: tensor parallel -> expert parallel
-> context parallel -> activation checkpointing -> compile -> FSDP/HSDP/DDP."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from parallel.context_parallel import apply_context_parallel
from parallel.data_parallel import apply_fsdp, check_reshard_after_forward, shard_experts
from parallel.expert_parallel import apply_expert_parallel
from parallel.errors import LayoutError
from parallel.mesh import ParallelDims, dp_mesh_for_fsdp, expert_dp_mesh
from parallel.plan import ModelPlan
from parallel.replica_reduction import ReplicaReduction, reduces_replicas_itself
from parallel.tensors import tie_parameters
from parallel.tensor_parallel import apply_tensor_parallel, check_tp_degree

AC_MODES = ("none", "full", "selective", "op")
_aten = torch.ops.aten
# What `op` keeps: the outputs of the matmuls and of attention (the FLOPs); norms, activations,
# rotary embeddings and the other elementwise ops are recomputed in backward.
SAVED_OPS = frozenset((_aten.mm, _aten.addmm, _aten.bmm, _aten._grouped_mm, _aten._scaled_dot_product_flash_attention,
                       _aten._scaled_dot_product_efficient_attention, _aten._scaled_dot_product_cudnn_attention,
                       _aten._scaled_dot_product_flash_attention_for_cpu))


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op.overloadpacket in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(blocks: nn.ModuleDict, mode: str, every: int) -> None:
    """Recompute block activations in backward: every block (`full`), every `every`-th (`selective`),
    or in every block only the cheap ops, keeping the matmul and attention outputs (`op`). The
    composable `checkpoint` keeps parameter names unchanged."""
    if mode not in AC_MODES:
        raise LayoutError("training.activation_checkpoint", f"unknown mode {mode!r}.", f"use one of {AC_MODES}.")
    if mode == "selective" and every < 1:
        raise LayoutError("training.activation_checkpoint_every", f"must be >= 1, got {every}.", "set it to 1 or more.")
    if mode == "none":
        return
    for position, block in enumerate(blocks.values()):
        if mode == "op":
            checkpoint(block, context_fn=partial(create_selective_checkpoint_contexts, _save_matmuls))
        elif mode == "full" or position % every == 0:
            checkpoint(block)


def parallelize(model: nn.Module, plan: ModelPlan, *, dims: ParallelDims, mesh: DeviceMesh | None,
                sequence_parallel: bool, loss_parallel: bool, reshard_after_forward: bool | int,
                activation_checkpoint: str = "none", activation_checkpoint_every: int = 1,
                compile: bool = False, param_dtype: torch.dtype | None = None, cpu_offload: bool = False,
                expert_mesh: DeviceMesh | None = None, linear_styles: tuple[type, type] | None = None,
                fsdp_prefetch: int = 1) -> ReplicaReduction | None:
    """Parallelize `model` (still on the meta device) in place according to `dims`; `expert_mesh`
    (`build_expert_mesh`) when dims.ep > 1; `linear_styles`: the blocks' linears' column- and
    row-wise TP styles when they are not plain linears (float8); `fsdp_prefetch`: FSDP units gathered
    ahead (`prefetch_units`). Returns the cross-replica gradient reduction the runner
    must drive (`ReplicaReduction`) where HSDP/DDP reduces across replicas itself: on gloo, without
    pipeline or expert parallelism (elsewhere FSDP's own, which overlaps on GPUs)."""
    blocks: nn.ModuleDict = model.get_submodule(plan.blocks)
    if dims.tp > 1:
        check_tp_degree(plan, dims.tp)
        apply_tensor_parallel(model, plan, mesh["tp"], sequence_parallel, loss_parallel, linear_styles)
        tie_parameters(model, plan.tied)  # TP replaced each module's parameter separately
    if dims.ep > 1:
        apply_expert_parallel(blocks, plan, expert_mesh["ep"])
    if dims.cp > 1:
        apply_context_parallel(blocks, plan, mesh["cp"].get_group())
    apply_activation_checkpointing(blocks, activation_checkpoint, activation_checkpoint_every)
    if compile:
        for block in blocks.values():
            block.compile()
    if cpu_offload and dims.fsdp_size == 1:
        raise LayoutError("parallel.cpu_offload", "offload is part of sharded data parallelism and needs dp > 1.",
                          "launch several data-parallel ranks with torchrun, or set parallel.cpu_offload=false.")
    if dims.fsdp_size > 1:
        raf = check_reshard_after_forward(reshard_after_forward, dims.dp_shard * dims.cp)
        dp_mesh = dp_mesh_for_fsdp(mesh, dims) if mesh is not None else None
        embedding, head = _separate_units(model, plan)
        if dims.ep > 1:
            shard_experts([blocks[k].get_submodule(plan.experts) for k in plan.sparse_blocks if k in blocks],
                          expert_dp_mesh(expert_mesh, dims), raf, param_dtype, cpu_offload)
        replicas = None
        if reduces_replicas_itself(dims, dp_mesh.device_type):
            replicas = ReplicaReduction(dp_mesh.get_group(0))
            dp_mesh = dp_mesh[dp_mesh.mesh_dim_names[1]]
        units = apply_fsdp(model, blocks, dp_mesh, raf, param_dtype, cpu_offload, embedding, head, fsdp_prefetch)
        if replicas is not None:
            for params in units:
                replicas.watch(params)
        return replicas
    return None


def _separate_units(model: nn.Module, plan: ModelPlan) -> tuple[nn.Module | None, list[nn.Module]]:
    """The embedding and the head (final norm, output) this model (or pipeline stage) holds, as FSDP
    units of their own; none when the embedding and output share a weight (it stays in the root)."""
    if plan.tied:
        return None, []
    embedding = _held_module(model, plan.embedding)
    head = [m for m in (_held_module(model, plan.final_norm), _held_module(model, plan.output)) if m is not None]
    return embedding, head


def _held_module(model: nn.Module, path: str) -> nn.Module | None:
    """The submodule at `path`, or None where this stage does not hold it."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None
