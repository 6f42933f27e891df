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

from functools import partial

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from parallel.errors import LayoutError
from parallel.plan import ModelPlan
from parallel.tensors import LastCallMemo


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


def key_gatherer(group: dist.ProcessGroup) -> LastCallMemo:
    """`(positions, documents) -> (gathered positions, gathered documents)` over `group`, gathered once
    per micro-batch and shared by every layer (their identity then lets the attention core build one
    mask for all layers)."""
    return LastCallMemo(lambda positions, documents: (
        gather_sequence(positions, 1, group),
        gather_sequence(documents, 1, group) if documents is not None else None))


class ContextParallelAttention(nn.Module):
    """Wraps an attention core `(q, k, v, q_positions, k_positions, q_documents, k_documents)`: the
    local queries attend over the keys and values of every cp rank.

    Plain causal attention (no documents) needs no mask of positions: the gathered keys are put in
    sequence order and each local query chunk `j` attends to the keys of chunks `0..j`, as the last
    tokens of that prefix (the core's no-positions case), which skips the keys it could not see. With
    document ids the core masks the gathered keys by position and document."""

    def __init__(self, core: nn.Module, group: dist.ProcessGroup, gathered: LastCallMemo):
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
        k_positions, k_documents = self.gathered(q_positions, q_documents)
        return self.core(q, k, v, q_positions, k_positions, q_documents, k_documents)

    def _causal_by_chunks(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        order = sequence_order(self.cp, k.shape[2] // (2 * self.cp), k.device)
        k, v = k.index_select(2, order), v.index_select(2, order)
        chunk = q.shape[2] // 2
        ends = tuple((index + 1) * chunk for index in (self.cp_rank, 2 * self.cp - 1 - self.cp_rank))
        if q.device.type == "cpu":
            return PrefixCausalCPU.apply(q, k, v, ends)
        outs = [self.core(q_chunk, k[:, :, :end], v[:, :, :end], None, None)
                for end, q_chunk in zip(ends, q.split(chunk, dim=2))]
        return torch.cat(outs, dim=2)


_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


class PrefixCausalCPU(torch.autograd.Function):
    """Causal attention of query chunks, chunk `i` being the last tokens of the key prefix `[0, ends[i])`,
    without materializing a mask (the CPU kernels take no lower-right causal mask): each chunk is
    the merge, by log-sum-exp, of full attention over the keys before it and causal attention over
    its own keys. Backward runs the kernel's backward on both parts with the merged output and
    log-sum-exp, which gives each part's exact share of the gradients. The output is laid out as
    (batch, seq, heads, dim) underneath, as SDPA's, so the output projection reads it without a copy.
    Grouped-query keys and values are repeated per call and their gradients summed back."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ends: tuple[int, ...]) -> torch.Tensor:
        batch, heads, length, dim = q.shape
        out = q.new_empty(batch, length, heads, dim).transpose(1, 2)
        full_k, full_v = _repeat_heads(k, heads), _repeat_heads(v, heads)
        lses = []
        for rows, end in zip(_chunk_rows(length, len(ends)), ends):
            out[:, :, rows], chunk_lse = _prefix_causal(q[:, :, rows], full_k[:, :, :end], full_v[:, :, :end])
            lses.append(chunk_lse)
        ctx.save_for_backward(q, k, v, out, torch.cat(lses, dim=2))
        ctx.ends = ends
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        heads, length = q.shape[1], q.shape[2]
        full_k, full_v = _repeat_heads(k, heads), _repeat_heads(v, heads)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(full_k), torch.zeros_like(full_v)
        for rows, end in zip(_chunk_rows(length, len(ctx.ends)), ctx.ends):
            start = end - (rows.stop - rows.start)
            g, o, l_ = grad[:, :, rows].contiguous(), out[:, :, rows], lse[:, :, rows]
            for keys, causal in ((slice(0, start), False), (slice(start, end), True)):
                if keys.stop > keys.start:
                    part = _FLASH_CPU_BACKWARD(g, q[:, :, rows], full_k[:, :, keys], full_v[:, :, keys], o, l_, 0.0,
                                               causal)
                    dq[:, :, rows] += part[0]
                    dk[:, :, keys] += part[1]
                    dv[:, :, keys] += part[2]
        return dq, _sum_heads(dk, k.shape[1]), _sum_heads(dv, v.shape[1]), None


def _chunk_rows(length: int, chunks: int) -> list[slice]:
    size = length // chunks
    return [slice(i * size, (i + 1) * size) for i in range(chunks)]


def _prefix_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, log-sum-exp) of `q`, the last tokens of `k`, attending causally to `k`."""
    start = k.shape[2] - q.shape[2]
    own, own_lse = _FLASH_CPU(q, k[:, :, start:], v[:, :, start:], 0.0, True)
    if start == 0:
        return own, own_lse
    before, before_lse = _FLASH_CPU(q, k[:, :, :start], v[:, :, :start], 0.0, False)
    lse = torch.logaddexp(before_lse, own_lse)
    out = before * (before_lse - lse).exp().unsqueeze(-1) + own * (own_lse - lse).exp().unsqueeze(-1)
    return out.to(q.dtype), lse


def _repeat_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def _sum_heads(grad: torch.Tensor, heads: int) -> torch.Tensor:
    batch, all_heads, length, dim = grad.shape
    return grad if all_heads == heads else grad.view(batch, heads, all_heads // heads, length, dim).sum(2)


def sequence_order(cp: int, chunk: int, device: torch.device) -> torch.Tensor:
    """Indices that put the rank-ordered gather (rank r: chunks r, 2cp-1-r) back in sequence order."""
    held = [c for r in range(cp) for c in (r, 2 * cp - 1 - r)]
    where = {c: slot for slot, c in enumerate(held)}
    return torch.cat([torch.arange(where[c] * chunk, (where[c] + 1) * chunk, device=device) for c in range(2 * cp)])


def sum_over_group(value: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """`value` (no gradient) summed over `group`, in place."""
    dist.all_reduce(value, group=group)
    return value


def apply_context_parallel(blocks: nn.ModuleDict, plan: ModelPlan, group: dist.ProcessGroup) -> None:
    """Wrap every block's attention core (it has no parameters: names and checkpoints are unchanged),
    and give the modules that keep per-sequence statistics the sum over the ranks sharing a sequence."""
    owner_path, _, name = plan.block.attention.rpartition(".")
    gathered = key_gatherer(group)
    for key, block in blocks.items():
        owner = block.get_submodule(owner_path) if owner_path else block
        setattr(owner, name, ContextParallelAttention(getattr(owner, name), group, gathered))
        for path in plan.block_plan(key).sequence_sums:
            block.get_submodule(path).sum_over_sequence = partial(sum_over_group, group=group)
