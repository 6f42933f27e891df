"""A function of whole matrices applied to sharded ones, each matrix computed once, on one rank.

An optimizer such as Muon needs every weight matrix whole (its update is a function of the full
matrix), but FSDP, HSDP, TP and EP leave each rank a slice. Gathering every matrix on every rank
would move the whole model to each rank and repeat the work everywhere. Instead, matrices alike
(same shape, mesh and placements: the same weight of every block) are stacked along a new leading
dimension and redistributed from their slices to whole matrices dealt out over all ranks of the
mesh (an all-to-all that each rank sends and receives about its share of the group), the function
runs on the whole matrices a rank was dealt, and the results go back to the original slices the same
way. Replicated mesh dimensions (HSDP's replicas) share the work too.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

import torch
from torch.distributed.tensor import DTensor, Shard

MatrixFunction = Callable[[torch.Tensor], torch.Tensor]


def group_alike(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of `tensors` in groups that can be stacked: same shape and dtype, and for DTensors the
    same mesh and placements."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        layout = (t.device_mesh, tuple(t.placements)) if isinstance(t, DTensor) else ()
        groups[(tuple(t.shape), t.dtype, *layout)].append(i)
    return list(groups.values())


def map_whole_matrices(tensors: Sequence[torch.Tensor], fn: MatrixFunction) -> list[torch.Tensor]:
    """`fn` of each of `tensors` (alike) as a whole: `fn` takes and returns a batch (k, ..., m, n) of
    whole tensors. Returns this rank's local part of every result, in the tensors' own layout."""
    if not isinstance(tensors[0], DTensor):
        return list(fn(torch.stack(list(tensors))).unbind(0))
    stacked = torch.stack(list(tensors))
    mesh = stacked.device_mesh
    dealt = stacked.redistribute(mesh, [Shard(0)] * mesh.ndim)
    done = DTensor.from_local(fn(dealt.to_local()), mesh, dealt.placements, shape=dealt.shape, stride=dealt.stride())
    return list(done.redistribute(mesh, stacked.placements).to_local().unbind(0))
