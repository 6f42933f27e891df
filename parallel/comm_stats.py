"""Communication accounting: bytes each rank moves, per collective kind and per mesh dimension.

A ``TorchDispatchMode`` sees every c10d collective that runs under it (FSDP's all-gathers and
reduce-scatters, DTensor's functional collectives, plain ``dist.all_reduce``), each with its process
group, so the bytes are exact and attributed to the mesh dimension whose group carried them.

Bytes are what one rank sends over the wire with ring algorithms, for a group of ``n`` ranks:
all-gather ``(n - 1) x shard``, reduce-scatter ``(n - 1) / n x input``, all-reduce
``2 (n - 1) / n x input``, broadcast / all-to-all ``(n - 1) / n x input`` (an uneven all-to-all: its
input less the rows it keeps); a point-to-point send (pipeline stages) its tensors.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

_c10d = torch.ops.c10d
_funcol = torch.ops._c10d_functional

# op -> (kind, index of the argument holding the input tensors)
COLLECTIVES = {
    _c10d._allgather_base_.default: ("all_gather", 1),
    _c10d.allgather_.default: ("all_gather", 1),
    _c10d.allgather_into_tensor_coalesced_.default: ("all_gather", 1),
    _c10d._reduce_scatter_base_.default: ("reduce_scatter", 1),
    _c10d.reduce_scatter_.default: ("reduce_scatter", 1),
    _c10d.reduce_scatter_tensor_coalesced_.default: ("reduce_scatter", 1),
    _c10d.allreduce_.default: ("all_reduce", 0),
    _c10d.allreduce_coalesced_.default: ("all_reduce", 0),
    _c10d.broadcast_.default: ("broadcast", 0),
    _c10d.alltoall_base_.default: ("all_to_all", 1),
    _c10d.send.default: ("send", 0),
    _funcol.all_gather_into_tensor.default: ("all_gather", 0),
    _funcol.all_gather_into_tensor_coalesced.default: ("all_gather", 0),
    _funcol.reduce_scatter_tensor.default: ("reduce_scatter", 0),
    _funcol.reduce_scatter_tensor_coalesced.default: ("reduce_scatter", 0),
    _funcol.all_reduce.default: ("all_reduce", 0),
    _funcol.all_reduce_coalesced.default: ("all_reduce", 0),
    _funcol.all_to_all_single.default: ("all_to_all", 0),
    _funcol.broadcast.default: ("broadcast", 0),
}


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _group_of(args: tuple) -> dist.ProcessGroup | None:
    for arg in args:
        if isinstance(arg, torch.ScriptObject) and "ProcessGroup" in str(arg._type()):
            return dist.ProcessGroup.unbox(arg)
        if isinstance(arg, str):
            try:
                return dist.distributed_c10d._resolve_process_group(arg)
            except (ValueError, RuntimeError, KeyError):
                continue
    return None


def wire_bytes(kind: str, input_bytes: int, group_size: int) -> float:
    n = group_size
    if n <= 1:
        return 0.0
    if kind == "all_gather":
        return input_bytes * (n - 1)
    if kind == "send":
        return input_bytes
    if kind == "all_reduce":
        return 2 * input_bytes * (n - 1) / n
    return input_bytes * (n - 1) / n


def mesh_group_names(mesh: DeviceMesh | None, dp_mesh: DeviceMesh | None = None,
                     expert_mesh: DeviceMesh | None = None) -> dict[str, str]:
    """Process-group name -> mesh dimension (`dp`: the flattened data-parallel mesh; `ep` and
    `expert_shard` from the expert mesh); inner dimensions win where groups coincide."""
    if mesh is None:
        return {}
    names: dict[str, str] = {}
    flattened = [d for d in ("dp_shard_cp", "dp_cp") if d in mesh._get_root_mesh()._flatten_mapping]
    for dim in ("tp", "cp", "dp_shard", "dp_replicate", "pp", *flattened):
        names.setdefault(mesh[dim].get_group().group_name, dim)
    if dp_mesh is not None:
        names.setdefault(dp_mesh.get_group().group_name, "dp")
    for dim, label in (("ep", "ep"), ("expert_shard", "expert_shard"), ("expert_shard_ep", "expert_shard"),
                       ("dp_replicate", "dp_replicate"), ("tp", "tp"), ("pp", "pp")) if expert_mesh is not None else ():
        names.setdefault(expert_mesh[dim].get_group().group_name, label)
    return names


class CommCounter(TorchDispatchMode):
    """Counts wire bytes by (mesh dimension, collective kind) while active."""

    def __init__(self, group_dims: dict[str, str]):
        super().__init__()
        self.group_dims = group_dims
        self.bytes: dict[tuple[str, str], float] = defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor lower to collectives, which come back here
        out = func(*args, **(kwargs or {}))
        spec = COLLECTIVES.get(func)
        if spec is not None:
            kind, index = spec
            group = _group_of(tuple(args) + tuple((kwargs or {}).values()))
            if group is not None:
                dim = self.group_dims.get(group.group_name, "other")
                sent = _tensor_bytes(args[index])
                splits = args[2] if func is _funcol.all_to_all_single.default else None
                if splits:  # uneven all-to-all: this rank's own rows never leave it
                    rows = args[index].shape[0]
                    own = splits[dist.get_group_rank(group, dist.get_rank())]
                    self.bytes[(dim, kind)] += sent * (rows - own) / max(rows, 1)
                else:
                    self.bytes[(dim, kind)] += wire_bytes(kind, sent, group.size())
        return out

    def by_dim_gb(self) -> dict[str, float]:
        """`comm_gb/<dim>` totals."""
        totals: dict[str, float] = defaultdict(float)
        for (dim, _), value in self.bytes.items():
            totals[f"comm_gb/{dim}"] += value / 1e9
        return dict(totals)
