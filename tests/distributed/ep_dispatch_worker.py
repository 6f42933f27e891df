"""Run under torchrun: expert-parallel experts (each rank holds n_experts / world of them and gets the
rows routed to them from every rank) against all experts computed locally, at uneven loads with
experts that get no rows, outputs and gradients of rows and weights. Exits non-zero on a mismatch."""

from __future__ import annotations

import os


import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from parallel.expert_parallel import apply_expert_parallel
from parallel.plan import BlockPlan, ModelPlan
from titan.models.moe import GroupedExperts

N_EXPERTS, DIM, HIDDEN = 8, 6, 5


def experts_block() -> torch.nn.ModuleDict:
    torch.manual_seed(3)
    block = torch.nn.Module()
    block.experts = GroupedExperts(N_EXPERTS, DIM, HIDDEN, "looped")
    for weight in (block.experts.w1, block.experts.w2, block.experts.w3):
        torch.nn.init.normal_(weight, std=0.3)
    return torch.nn.ModuleDict({"0": block})


def case(counts: list[int], rank: int, world: int, mesh) -> None:
    """`counts`: this rank's rows per expert (some zero)."""
    gen = torch.Generator().manual_seed(100 + rank)
    rows = torch.randn(sum(counts), DIM, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(sum(counts), DIM, generator=gen, dtype=torch.float64)
    reference = experts_block().double()
    local_rows = rows.clone().requires_grad_()
    expected = reference["0"].experts(local_rows, torch.tensor(counts))
    expected.backward(grad_out)

    sharded = experts_block().double()
    plan = ModelPlan(embedding="", blocks="", final_norm="", output="", block=BlockPlan((), (), ()),
                     sparse_blocks=("0",), experts="experts")
    apply_expert_parallel(sharded, plan, mesh)
    ep_rows = rows.clone().requires_grad_()
    got = sharded["0"].experts(ep_rows, torch.tensor(counts))
    got.backward(grad_out)

    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ep_rows.grad, local_rows.grad, rtol=1e-10, atol=1e-10)
    for name in ("w1", "w2", "w3"):
        mine = getattr(sharded["0"].experts, name).grad
        assert isinstance(mine, DTensor)
        # The weights' gradients come out divided by ep (FSDP's mean completes the average); summed
        # over the ranks they are the sum of every rank's local gradient.
        full = mine.full_tensor() * world
        reference_grad = getattr(reference["0"].experts, name).grad.clone()
        dist.all_reduce(reference_grad)
        torch.testing.assert_close(full, reference_grad, rtol=1e-10, atol=1e-10, msg=lambda m: f"d{name}: {m}")


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    case([(rank * 3 + e * 5) % 7 for e in range(N_EXPERTS)], rank, world, mesh)  # uneven, some experts empty
    case([0] * N_EXPERTS if rank == 0 else [e % 3 for e in range(N_EXPERTS)], rank, world, mesh)  # a rank with none
    case([0] * N_EXPERTS, rank, world, mesh)  # no rows anywhere
    dist.barrier()
    if rank == 0:
        print(f"ep dispatch matches at world {world}", flush=True)
    dist.destroy_process_group()
    os._exit(0)  # no interpreter teardown of gloo objects still held by DTensors (see parallel.mesh.run_main)


if __name__ == "__main__":
    main()
