"""Expert parallelism: each rank of an `ep` group holds n_experts / ep of every MoE layer's experts,
and the tokens routed to an expert travel to the rank that holds it and back.

A model declares, per sparse block, an experts module (`ModelPlan.experts`) whose weights are
stacked with the expert on dim 0 and which is called with (token rows grouped by expert, rows per
expert). Expert parallelism shards those weights on dim 0 over the ep mesh (DTensors, so a
checkpoint holds every expert under one global name and reshapes across ep degrees), and wraps the
call: the counts per expert go to every rank first (one small all-to-all: the split sizes of the
token all-to-all must be Python ints), then the rows (an uneven all-to-all with autograd), regrouped
by local expert; the outputs go back the same way. The gradient of each expert then sums over every
rank's tokens: the experts see their output gradients divided by ep and pass their input gradients
on multiplied back, so the weights' gradients come out ep times smaller and FSDP's mean over the
ranks that share an expert makes them the mean over every data-parallel rank, as for dense weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_module, distribute_tensor

from parallel.errors import LayoutError
from parallel.plan import ModelPlan
from parallel.tensors import inverse_permutation


class _Dispatch:
    """The routing of one call: which rows go where, to undo it for the outputs."""

    def __init__(self, group: dist.ProcessGroup, counts: torch.Tensor):
        """`counts`: rows per expert, for every expert of the layer (this rank's tokens)."""
        ep = group.size()
        local = counts.numel() // ep
        sent = counts.view(ep, local)
        received = torch.empty_like(sent)
        dist.all_to_all_single(received, sent, group=group)  # received[r, e]: rows from rank r for local expert e
        self.group = group
        self.send_splits = sent.sum(dim=1).tolist()
        self.recv_splits = received.sum(dim=1).tolist()
        self.local_counts = received.sum(dim=0)
        # Rows arrive grouped by source rank, then local expert; regroup by local expert, then source.
        source_major = torch.arange(received.numel(), device=counts.device).view(ep, local)
        block_of_row = source_major.flatten().repeat_interleave(received.flatten())
        place_of_block = inverse_permutation(source_major.t().flatten())  # block -> its place, expert-major
        self.order = torch.argsort(place_of_block[block_of_row], stable=True)

    def to_experts(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows (grouped by global expert) -> the rows of its local experts (grouped by expert)."""
        received = all_to_all_single_autograd(rows, self.recv_splits, self.send_splits, self.group)
        return received[self.order]

    def from_experts(self, rows: torch.Tensor) -> torch.Tensor:
        """The local experts' outputs -> the outputs of this rank's rows, in their order."""
        return all_to_all_single_autograd(rows[inverse_permutation(self.order)], self.send_splits, self.recv_splits,
                                          self.group)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `factor`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def _shard_experts(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    """Every weight of the experts module: shard dim 0 (the expert) over the ep ranks."""
    for param_name, param in list(module.named_parameters(recurse=False)):
        sharded = nn.Parameter(distribute_tensor(param, mesh, [Shard(0)], src_data_rank=None),
                               requires_grad=param.requires_grad)
        module.register_parameter(param_name, sharded)


def _dispatch_inputs(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
    rows, counts = inputs
    module._ep_dispatch = _Dispatch(mesh.get_group(), counts)
    rows = _ScaleGradient.apply(module._ep_dispatch.to_experts(rows), float(mesh.size()))
    return rows, module._ep_dispatch.local_counts


def _combine_outputs(module: nn.Module, outputs: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    dispatch, module._ep_dispatch = module._ep_dispatch, None
    return dispatch.from_experts(_ScaleGradient.apply(outputs, 1.0 / mesh.size()))


def check_ep_degree(n_experts: int, ep: int) -> None:
    """Every rank of an ep group holds the same number of experts."""
    if n_experts % ep:
        raise LayoutError("parallel.ep", f"ep={ep} does not divide the {n_experts} experts.",
                          "choose parallel.ep dividing model.moe.n_experts.")


def apply_expert_parallel(blocks: nn.ModuleDict, plan: ModelPlan, ep_mesh: DeviceMesh) -> None:
    """Shard the experts of every sparse block this model (or pipeline stage) holds over `ep_mesh`
    and route their tokens through it."""
    for key in plan.sparse_blocks:
        if key not in blocks:
            continue
        experts = blocks[key].get_submodule(plan.experts)
        n_experts = next(experts.parameters()).shape[0]
        check_ep_degree(n_experts, ep_mesh.size())
        distribute_module(experts, ep_mesh, _shard_experts, input_fn=_dispatch_inputs, output_fn=_combine_outputs)
