"""How a model describes itself to `parallel/`, so that `parallel/` never imports a model.

A model returns a :class:`ModelPlan` naming, by module path, its embedding, its stack of blocks
(the unit of FSDP sharding, activation checkpointing, compilation and pipeline cuts), its final
norm and output projection, and inside each block which linears split column-wise or row-wise for
tensor parallelism and which modules are norms on the residual stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class BlockPlan:
    """Module paths relative to one block."""

    colwise: tuple[str, ...]  # linears whose output features split over tp ranks
    rowwise: tuple[str, ...]  # linears whose input features split over tp ranks (their output is reduced)
    norms: tuple[str, ...]  # norms on the residual stream (sequence-parallel regions)
    # sub-modules entered from the residual stream -> their number of positional inputs; under
    # sequence parallelism their first input is gathered from a sequence shard
    tp_inputs: dict[str, int] = field(default_factory=dict)
    # the attention core: a module called (q, k, v, q_positions, k_positions, q_documents, k_documents)
    # with (batch, heads, seq, head_dim) tensors and (batch, seq) positions / document ids; context
    # parallelism gathers its keys, values, key positions and documents from the other ranks
    attention: str | None = None
    # sub-modules entered from the residual stream that every tp rank computes whole, on the whole
    # sequence (an MoE layer: expert parallelism, not tp, splits its experts)
    replicated: tuple[str, ...] = ()
    # sub-modules that keep statistics of whole sequences: their `sum_over_sequence(tensor)` (identity
    # by default) is set by context parallelism to sum over the ranks holding parts of the sequences
    sequence_sums: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelPlan:
    embedding: str
    blocks: str  # a ModuleDict of blocks keyed by global index
    final_norm: str
    output: str
    block: BlockPlan
    tied: tuple[tuple[str, str], ...] = ()  # (follower, source) parameter paths that share one tensor
    tp_divisible: dict[str, int] = field(default_factory=dict)  # config key -> size that must split over tp
    # mixture of experts: the blocks (keys) holding an MoE layer, their plan, and the path (in such a
    # block) of the experts module: weights stacked with the expert on dim 0, called with (tokens grouped
    # by expert, a tensor of tokens per expert) and returning one output row per token row
    sparse_blocks: tuple[str, ...] = ()
    sparse_block: BlockPlan | None = None
    experts: str | None = None

    def block_plan(self, key: str) -> BlockPlan:
        """The plan of the block stored under `key`."""
        return self.sparse_block if key in self.sparse_blocks else self.block
