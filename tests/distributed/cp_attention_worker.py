"""Run under torchrun: context-parallel attention against unsplit SDPA on the full sequence, outputs
and gradients of q, k and v, with GQA and with document ids. Exits non-zero on a mismatch."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from parallel.context_parallel import ContextParallelAttention, key_gatherer, shard_sequence
from titan.data.packing import document_ids
from titan.models.llama import CausalAttention


def case(heads: int, kv_heads: int, with_documents: bool, rank: int, world: int) -> None:
    gen = torch.Generator().manual_seed(7)
    batch, seq, dim = 2, 8 * world, 16
    q = torch.randn(batch, heads, seq, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, seq, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, seq, dim, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(batch, heads, seq, dim, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, 5, (batch, seq), generator=gen)
    documents = document_ids(tokens, eot_id=0) if with_documents else None
    positions = torch.arange(seq).expand(batch, seq)

    full = [t.clone().requires_grad_() for t in (q, k, v)]
    out = CausalAttention()(*full, positions, positions, documents, documents)
    out.backward(grad_out)

    local = [shard_sequence(t, rank, world, dim=2).detach().requires_grad_() for t in (q, k, v)]
    pos = shard_sequence(positions, rank, world)
    docs = shard_sequence(documents, rank, world) if documents is not None else None
    out_cp = ContextParallelAttention(CausalAttention(), dist.group.WORLD, key_gatherer(dist.group.WORLD))(*local, pos, pos, docs, docs)
    out_cp.backward(shard_sequence(grad_out, rank, world, dim=2))

    torch.testing.assert_close(out_cp, shard_sequence(out, rank, world, dim=2), rtol=1e-10, atol=1e-10)
    for name, mine, reference in zip("qkv", local, full):
        torch.testing.assert_close(mine.grad, shard_sequence(reference.grad, rank, world, dim=2), rtol=1e-10,
                                   atol=1e-10, msg=lambda m: f"d{name} differs: {m}")


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for heads, kv_heads in ((4, 4), (4, 2)):
        for with_documents in (False, True):
            case(heads, kv_heads, with_documents, rank, world)
    dist.barrier()
    if rank == 0:
        print(f"cp attention matches at world {world}", flush=True)
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
