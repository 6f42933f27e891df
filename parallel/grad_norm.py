"""Gradient-norm clipping that is correct over every mesh dimension.

Gradients may be DTensors on different meshes (FSDP x TP blocks, FSDP-only norms), or plain
tensors, and under pipeline parallelism each rank holds only its stages. The norm is computed per
group of like-placed gradients, materialized (DTensor reductions over their shards), summed in
squares, then summed over the pipeline group.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _layout_key(grad: torch.Tensor) -> tuple:
    if isinstance(grad, DTensor):
        return (id(grad.device_mesh), tuple(grad.placements), grad.dtype)
    return ("local", grad.device, grad.dtype)


@torch.no_grad()
def clip_grad_norm_(params: list[torch.Tensor], max_norm: float, pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Scale gradients so their global L2 norm is at most `max_norm`; return the norm before clipping."""
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        if p.grad is not None:
            groups[_layout_key(p.grad)].append(p.grad)
    device = next(iter(groups.values()))[0].device if groups else torch.device("cpu")
    squares = torch.zeros((), device=device, dtype=torch.float32)
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares += norm.float() ** 2
    if pp_group is not None:
        dist.all_reduce(squares, group=pp_group)
    total = squares.sqrt()
    if math.isfinite(max_norm):
        coef = min(1.0, max_norm / (total.item() + 1e-6))
        if coef < 1.0:
            for grads in groups.values():
                torch._foreach_mul_(grads, coef)
    return total
