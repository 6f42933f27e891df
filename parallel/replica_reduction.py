"""HSDP's (and DDP's) gradient all-reduce across replicas, overlapped with backward where the
backend's collectives block the caller (gloo).

FSDP2's own HSDP reduces each unit's gradient shard over the replicas inside its post-backward; on
GPUs that runs on a side stream, but on gloo it blocks backward until the slow cross-host link has
carried it, so every unit's link time adds to the step. Here FSDP shards over a replica's own ranks
only, and once the step's last backward has produced a unit's gradient shards (FSDP calls the
shards' post-accumulate-grad hooks), they are copied into one buffer and summed over the replicas
by one asynchronous all-reduce, while backward goes on with the next unit. ``finish()`` waits for
them and writes the averages back before anything reads a gradient. Every rank launches the
all-reduces in the same order: the order backward reaches the units.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from parallel.mesh import ParallelDims
from parallel.tensors import local_tensor


def reduces_replicas_itself(dims: ParallelDims, device_type: str) -> bool:
    """Whether the cross-replica reduction is this module's (once per step, overlapped) rather than
    FSDP's (every micro-batch): HSDP or DDP on gloo, without pipeline or expert parallelism."""
    return dims.dp_replicate > 1 and dims.pp == 1 and dims.ep == 1 and device_type == "cpu"


@dataclass
class _Unit:
    params: list[nn.Parameter]
    ready: list[nn.Parameter] = field(default_factory=list)


class ReplicaReduction:
    """Asynchronous all-reduce (mean) of FSDP units' gradient shards over `group`, the replicas."""

    def __init__(self, group: dist.ProcessGroup):
        self.group, self.replicas = group, dist.get_world_size(group)
        self.armed = False
        self.units: list[_Unit] = []
        self.pending: list[tuple[dist.Work, torch.Tensor, list[torch.Tensor]]] = []

    def watch(self, params: list[nn.Parameter]) -> None:
        """Reduce these parameters' gradients (one FSDP unit's shards) together, once all are ready."""
        unit = _Unit([p for p in params if p.requires_grad])
        if not unit.params:
            return
        self.units.append(unit)

        def ready(param: nn.Parameter) -> None:
            if self.armed:
                unit.ready.append(param)
                if len(unit.ready) == len(unit.params):
                    self._launch(unit)

        for param in unit.params:
            param.register_post_accumulate_grad_hook(ready)

    def arm(self) -> None:
        """The next backward is the step's last: reduce each unit as its gradients become final."""
        self.armed = True

    def finish(self) -> None:
        """Wait for every reduction, average, and write the results into the gradients."""
        for unit in self.units:  # a unit some of whose parameters got no gradient this step
            if unit.ready:
                self._launch(unit)
        for work, flat, grads in self.pending:
            work.wait()
            flat.div_(self.replicas)
            torch._foreach_copy_(grads, list(flat.split([g.numel() for g in grads])))
        self.pending.clear()
        self.armed = False

    def _launch(self, unit: _Unit) -> None:
        grads = [local_tensor(p.grad) for p in unit.ready]
        flat = torch.cat([g.reshape(-1) for g in grads])
        grads = [g.view(-1) for g in grads]
        self.pending.append((dist.all_reduce(flat, group=self.group, async_op=True), flat, grads))
        unit.ready = []
