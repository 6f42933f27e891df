"""Sharded data parallelism on FSDP2: ZeRO-3, ZeRO-2-like, hpZ secondary partition, HSDP, DDP.

One function covers the family, chosen by the mesh and `reshard_after_forward`:

- ``dp_shard > 1`` on a 1-D mesh: FSDP (ZeRO-3 with ``True``: parameters re-sharded after forward
  and gathered again in backward; ZeRO-2-like with ``False``: gathered parameters kept until backward).
- ``reshard_after_forward=<int>``: hpZ-style secondary partition: after forward, parameters stay
  sharded over groups of that many ranks (e.g. one node), so backward all-gathers stay in the group.
- a 2-D ``(dp_replicate, dp_shard)`` mesh: HSDP, sharded inside a group, replicated across groups
  (gradients reduce-scattered inside, all-reduced across). With ``dp_shard == 1`` this is plain DDP
  (replicated parameters, all-reduced gradients). On gloo the all-reduce across replicas is done by
  `parallel.replica_reduction` instead, overlapped with backward (FSDP then shards over the inside mesh).

Each block is one FSDP unit (one all-gather / reduce-scatter per block), plus the root for the
embedding, final norm and output.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import Shard

from parallel.errors import LayoutError


def check_reshard_after_forward(value: bool | int, dp_shard: int) -> bool | int:
    """`parallel.reshard_after_forward`: true / false / an int dividing dp_shard."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value >= 1 and dp_shard % value == 0:
        return True if value == dp_shard else (False if value == 1 else value)
    raise LayoutError("parallel.reshard_after_forward",
                      f"{value!r} is not true, false or a positive integer dividing dp_shard={dp_shard}.",
                      "use true (ZeRO-3), false (ZeRO-2-like) or e.g. the ranks per node (secondary partition).")


def _policies(param_dtype: torch.dtype | None, cpu_offload: bool) -> dict:
    return {"mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
            "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy()}


def shard_experts(experts: list[nn.Module], mesh: DeviceMesh, reshard_after_forward: bool | int,
                  param_dtype: torch.dtype | None, cpu_offload: bool) -> None:
    """Expert-parallel experts as FSDP units of their own, over the data-parallel ranks that hold the
    same experts (`mesh`). Their weights are already split by expert (dim 0), so FSDP splits dim 1
    (a secondary partition size, meant for the dense weights' mesh, falls back to ZeRO-3 here)."""
    for module in experts:
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward if isinstance(
            reshard_after_forward, bool) else True, shard_placement_fn=lambda param: Shard(1),
                    **_policies(param_dtype, cpu_offload))


def apply_fsdp(model: nn.Module, blocks: nn.ModuleDict, dp_mesh: DeviceMesh, reshard_after_forward: bool | int,
               param_dtype: torch.dtype | None, cpu_offload: bool, embedding: nn.Module | None = None,
               head: list[nn.Module] | None = None, prefetch: int = 1) -> list[list[nn.Parameter]]:
    """Shard over `dp_mesh` (1-D: FSDP; 2-D: HSDP/DDP) the embedding, each block and the head (final
    norm + output projection) as units of their own, then the root (what is left, e.g. a weight the
    embedding and output share). Units gathered one at a time keep the peak low: the embedding's
    and the output's full weights are never held through the whole step. `prefetch`: units gathered
    ahead of use (`prefetch_units`). Returns each unit's (sharded) parameters, the root's last."""
    shard = partial(fully_shard, mesh=dp_mesh, **_policies(param_dtype, cpu_offload))
    if embedding is not None:
        shard(embedding, reshard_after_forward=reshard_after_forward)
    ids = list(blocks.keys())
    for position, key in enumerate(ids):
        # Backward starts with the last block (and the head): regathering them right away would be wasted.
        last = position == len(ids) - 1
        shard(blocks[key], reshard_after_forward=False if last else reshard_after_forward)
    if head:
        shard(head, reshard_after_forward=False)
    shard(model, reshard_after_forward=False)
    units = [*([[embedding]] if embedding is not None else []), *([block] for block in blocks.values()),
             *([head] if head else [])]
    prefetch_units(model, [unit[0] for unit in units], prefetch, dp_mesh.device_type)
    owned = [[p for module in unit for p in module.parameters()] for unit in units]
    held = {id(p) for params in owned for p in params}
    return [*owned, [p for p in model.parameters() if id(p) not in held]]


def prefetch_units(root: nn.Module, units: list[nn.Module], depth: int, device_type: str) -> None:
    """Each unit issues the all-gathers of the `depth` units that follow it, in forward order in forward
    and in reverse order in backward, before its own compute. On GPUs FSDP's side streams run them
    (depth 1 is FSDP's implicit order, issued earlier); on gloo there are no streams and FSDP's own
    all-gathers block the rank, so they are made asynchronous: the gathers of the next units then run
    on gloo's threads while this unit computes. 0 keeps FSDP's defaults."""
    if depth == 0 or not units:
        return
    if device_type != "cuda":
        root._set_unshard_async_op(True)
    root.set_modules_to_forward_prefetch(units[:depth])
    for position, unit in enumerate(units):
        unit.set_modules_to_forward_prefetch(units[position + 1:position + 1 + depth])
        unit.set_modules_to_backward_prefetch(units[max(0, position - depth):position][::-1])
