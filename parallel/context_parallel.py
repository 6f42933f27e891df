"""Context parallelism: each rank of a `cp` group holds part of every sequence.

The sequence is cut into ``2 x cp`` chunks and rank ``i`` keeps chunks ``i`` and ``2 cp - 1 - i``:
under a causal mask the early chunks have little work and the late ones much, so pairing them gives
every rank the same number of query-key pairs (the Llama 3 scheme). Everything position-wise (the
embedding, norms, MLP, the loss) runs on the local tokens; attention needs the keys and values of
the whole sequence, so the model's attention core (declared in its plan) is wrapped: keys, values,
their positions and document ids are all-gathered over the cp group with a differentiable
functional collective (its backward reduce-scatters the key/value gradients back to their ranks),
and the core masks by global position, so the causal and document masks stay exact.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from parallel.errors import LayoutError
from parallel.plan import ModelPlan


def check_cp_degree(plan: ModelPlan, cp: int, seq_len: int) -> None:
    """A model whose plan names its attention core, and sequences that cut into 2 x cp chunks."""
    if plan.block.attention is None:
        raise LayoutError("parallel.cp", "this model's plan declares no attention core, so its sequences cannot "
                          "be split over context-parallel ranks.", "set parallel.cp=1.")
    if seq_len % (2 * cp):
        raise LayoutError("training.seq_len", f"{seq_len} tokens do not cut into 2 x cp = {2 * cp} equal chunks.",
                          f"choose training.seq_len divisible by {2 * cp}, or another parallel.cp.")


def shard_sequence(t: torch.Tensor, cp_rank: int, cp: int, dim: int = 1) -> torch.Tensor:
    """This rank's chunks `cp_rank` and `2 cp - 1 - cp_rank` of `t` along `dim`, joined."""
    chunks = t.chunk(2 * cp, dim=dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp - 1 - cp_rank]], dim=dim)


def gather_sequence(t: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """`t` of every cp rank joined along `dim` (rank order); differentiable (backward: reduce-scatter)."""
    front = t.movedim(dim, 0).contiguous()
    gathered = funcol.all_gather_single_autograd(front, 0, group)
    return funcol.wait_tensor(gathered).movedim(0, dim)


class ContextParallelAttention(nn.Module):
    """Wraps an attention core `(q, k, v, q_positions, k_positions, q_documents, k_documents)`: the
    local queries attend over the keys and values of every cp rank."""

    def __init__(self, core: nn.Module, group: dist.ProcessGroup):
        super().__init__()
        self.core, self.group = core, group

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor | None,
                k_positions: torch.Tensor | None, q_documents: torch.Tensor | None = None,
                k_documents: torch.Tensor | None = None) -> torch.Tensor:
        if k_positions is None:
            raise ValueError("context parallel attention needs the tokens' global positions")
        k, v = gather_sequence(k, 2, self.group), gather_sequence(v, 2, self.group)
        k_positions = gather_sequence(k_positions, 1, self.group)
        if k_documents is not None:
            k_documents = gather_sequence(k_documents, 1, self.group)
        return self.core(q, k, v, q_positions, k_positions, q_documents, k_documents)


def apply_context_parallel(blocks: nn.ModuleDict, plan: ModelPlan, group: dist.ProcessGroup) -> None:
    """Wrap every block's attention core (it has no parameters: names and checkpoints are unchanged)."""
    owner_path, _, name = plan.block.attention.rpartition(".")
    for block in blocks.values():
        owner = block.get_submodule(owner_path) if owner_path else block
        setattr(owner, name, ContextParallelAttention(getattr(owner, name), group))
