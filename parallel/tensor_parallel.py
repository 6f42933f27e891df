"""Tensor parallelism (Megatron-style) with optional sequence parallelism and loss parallelism.

Column-wise linears split their output features over the tp ranks, row-wise linears their input
features, so each block needs one all-reduce (or, with sequence parallelism, one all-gather before
and one reduce-scatter after each of attention and MLP). With sequence parallelism the residual
stream and the norms hold a 1/tp slice of the sequence. With loss parallelism the output projection
keeps its vocabulary shard and cross-entropy runs on the sharded logits, so no rank holds full logits.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from parallel.errors import LayoutError
from parallel.plan import ModelPlan


def check_tp_degree(plan: ModelPlan, tp: int) -> None:
    """Every sharded size (heads, vocabulary, hidden) must split evenly over the tp ranks."""
    for key, count in plan.tp_divisible.items():
        if count % tp:
            raise LayoutError("parallel.tp", f"tp={tp} does not divide {key}={count}.",
                              f"choose parallel.tp dividing {count}.")


def apply_tensor_parallel(model: nn.Module, plan: ModelPlan, tp_mesh: DeviceMesh, sequence_parallel: bool,
                          loss_parallel: bool, linear_styles: tuple[type, type] | None = None) -> None:
    """Shard the model's linears, embedding and output over `tp_mesh` in place; `linear_styles`: the
    column- and row-wise styles of the blocks' linears where they are not torch's (float8 linears)."""
    colwise, rowwise = linear_styles or (ColwiseParallel, RowwiseParallel)
    residual = Shard(1) if sequence_parallel else Replicate()
    top = {
        plan.embedding: RowwiseParallel(input_layouts=Replicate(), output_layouts=residual),
        plan.output: ColwiseParallel(input_layouts=residual,
                                     output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                     use_local_output=not loss_parallel),
    }
    if sequence_parallel:
        top[plan.final_norm] = SequenceParallel()
    parallelize_module(model, tp_mesh, top)
    blocks: nn.ModuleDict = model.get_submodule(plan.blocks)
    for key, block in blocks.items():
        block_plan = plan.block_plan(key)
        layer_plan: dict = {name: colwise() for name in block_plan.colwise}
        layer_plan.update({name: rowwise(output_layouts=residual) for name in block_plan.rowwise})
        if sequence_parallel:
            layer_plan.update({name: SequenceParallel() for name in block_plan.norms})
        # Enter attention / MLP with a Replicate DTensor (gathered from the sequence shard under SP):
        # backward then reduces the input gradient once per sub-module instead of once per linear.
        layer_plan.update({
            name: PrepareModuleInput(input_layouts=(residual,) + (None,) * (n_inputs - 1),
                                     desired_input_layouts=(Replicate(),) + (None,) * (n_inputs - 1),
                                     use_local_output=False)
            for name, n_inputs in block_plan.tp_inputs.items()})
        # Computed whole on every tp rank: enter with the whole sequence, leave as the residual's layout.
        layer_plan.update({
            name: PrepareModuleInputOutput(input_layouts=(residual,), desired_input_layouts=(Replicate(),),
                                           use_local_input=True, output_layouts=(Replicate(),),
                                           desired_output_layouts=(residual,), use_local_output=True)
            for name in block_plan.replicated})
        parallelize_module(block, tp_mesh, layer_plan)
