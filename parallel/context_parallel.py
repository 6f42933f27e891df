"""Context parallelism: each rank of a `cp` group holds part of every sequence.

The sequence is cut into ``2 x cp`` chunks and rank ``i`` keeps chunks ``i`` and ``2 cp - 1 - i``:
under a causal mask the early chunks have little work and the late ones much, so pairing them gives
every rank the same number of query-key pairs (the Llama 3 scheme). Everything position-wise (the
embedding, norms, MLP, the loss) runs on the local tokens; attention needs the keys and values of
the whole sequence, so the model's attention core (declared in its plan) is wrapped: keys and values
are all-gathered over the cp group with a differentiable functional collective (its backward
reduce-scatters the key/value gradients back to their ranks). Causal attention then runs per local
query chunk over the key prefix it may see; with document masking the keys' positions and document
ids are gathered too (once per micro-batch) and the core masks by them, so both stay exact.
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


class GatheredKeys:
    """Key positions and documents gathered once per micro-batch and shared by every layer (their
    identity then lets the attention core build one mask for all layers)."""

    def __init__(self) -> None:
        self.key: tuple = ()
        self.value: tuple = ()

    def get(self, positions: torch.Tensor, documents: torch.Tensor | None, group: dist.ProcessGroup) -> tuple:
        if len(self.key) != 2 or self.key[0] is not positions or self.key[1] is not documents:
            self.key = (positions, documents)
            self.value = (gather_sequence(positions, 1, group),
                          gather_sequence(documents, 1, group) if documents is not None else None)
        return self.value


class ContextParallelAttention(nn.Module):
    """Wraps an attention core `(q, k, v, q_positions, k_positions, q_documents, k_documents)`: the
    local queries attend over the keys and values of every cp rank.

    Plain causal attention (no documents) needs no mask of positions: the gathered keys are put in
    sequence order and each local query chunk `j` attends to the keys of chunks `0..j`, as the last
    tokens of that prefix (the core's no-positions case), which skips the keys it could not see. With
    document ids the core masks the gathered keys by position and document."""

    def __init__(self, core: nn.Module, group: dist.ProcessGroup, gathered: GatheredKeys):
        super().__init__()
        self.core, self.group, self.gathered = core, group, gathered
        self.cp, self.cp_rank = dist.get_world_size(group), dist.get_rank(group)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor | None,
                k_positions: torch.Tensor | None, q_documents: torch.Tensor | None = None,
                k_documents: torch.Tensor | None = None) -> torch.Tensor:
        k, v = gather_sequence(k, 2, self.group), gather_sequence(v, 2, self.group)
        if q_documents is None:
            return self._causal_by_chunks(q, k, v)
        if q_positions is None:
            raise ValueError("context parallel attention with documents needs the tokens' global positions")
        k_positions, k_documents = self.gathered.get(q_positions, q_documents, self.group)
        return self.core(q, k, v, q_positions, k_positions, q_documents, k_documents)

    def _causal_by_chunks(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        order = sequence_order(self.cp, k.shape[2] // (2 * self.cp), k.device)
        k, v = k.index_select(2, order), v.index_select(2, order)
        chunk = q.shape[2] // 2
        outs = []
        for index, q_chunk in zip((self.cp_rank, 2 * self.cp - 1 - self.cp_rank), q.split(chunk, dim=2)):
            end = (index + 1) * chunk
            outs.append(self.core(q_chunk, k[:, :, :end], v[:, :, :end], None, None))
        return torch.cat(outs, dim=2)


def sequence_order(cp: int, chunk: int, device: torch.device) -> torch.Tensor:
    """Indices that put the rank-ordered gather (rank r: chunks r, 2cp-1-r) back in sequence order."""
    held = [c for r in range(cp) for c in (r, 2 * cp - 1 - r)]
    where = {c: slot for slot, c in enumerate(held)}
    return torch.cat([torch.arange(where[c] * chunk, (where[c] + 1) * chunk, device=device) for c in range(2 * cp)])


def apply_context_parallel(blocks: nn.ModuleDict, plan: ModelPlan, group: dist.ProcessGroup) -> None:
    """Wrap every block's attention core (it has no parameters: names and checkpoints are unchanged)."""
    owner_path, _, name = plan.block.attention.rpartition(".")
    gathered = GatheredKeys()
    for block in blocks.values():
        owner = block.get_submodule(owner_path) if owner_path else block
        setattr(owner, name, ContextParallelAttention(getattr(owner, name), group, gathered))
