"""Run under torchrun (gloo): FSDP units gathered ahead. With `prefetch` 1 or 2, the next units'
all-gathers are in flight (asynchronous, not yet waited for) when a block starts its compute; with 0
they are not; the loss and every gradient are bitwise those of 0. Exits non-zero otherwise."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from parallel.data_parallel import apply_fsdp

LAYERS, DIM, VOCAB = 4, 16, 32


class Toy(nn.Module):
    """Embedding, a stack of linear blocks, norm and output: the unit structure of the Llama."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleDict({str(i): nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh()) for i in range(LAYERS)})
        self.norm = nn.RMSNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embedding(tokens)
        for layer in self.layers.values():
            h = layer(h)
        return self.output(self.norm(h))


def in_flight(unit: nn.Module) -> bool:
    """Whether the unit's all-gather is issued asynchronously and not yet waited for."""
    result = unit._get_fsdp_state()._fsdp_param_group._all_gather_result
    return result is not None and result.all_gather_work is not None


def run(prefetch: int, mesh) -> tuple[torch.Tensor, list[torch.Tensor], list[list[bool]]]:
    torch.manual_seed(0)
    model = Toy()
    apply_fsdp(model, model.layers, mesh, True, None, False, model.embedding, [model.norm, model.output],
               prefetch=prefetch)
    blocks = list(model.layers.values())
    seen = []
    for position, block in enumerate(blocks):
        ahead = [*blocks[position + 1:], model.norm][:2]
        block.register_forward_pre_hook(lambda module, args, ahead=ahead: seen.append([in_flight(u) for u in ahead]))
    tokens = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(dist.get_rank()))
    loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten())
    loss.backward()
    grads = [p.grad.full_tensor() for p in model.parameters()]
    return loss.detach(), grads, seen


def main() -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    loss0, grads0, seen0 = run(0, mesh)
    assert not any(any(row) for row in seen0), seen0
    for prefetch in (1, 2):
        loss, grads, seen = run(prefetch, mesh)
        assert all(all(row[:prefetch]) for row in seen), (prefetch, seen)
        assert torch.equal(loss, loss0), (prefetch, loss, loss0)
        for got, want in zip(grads, grads0, strict=True):
            assert torch.equal(got, want), prefetch
    dist.barrier()
    if dist.get_rank() == 0:
        print("fsdp prefetch ahead and exact", flush=True)
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
