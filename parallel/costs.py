"""Closed forms of the bytes one rank sends per micro-batch, per parallel dimension, counted as
`parallel.comm_stats` counts them (ring algorithms; `benchmarks/comm.py` checks them against the
`comm_gb/<dim>` of real runs), and the time a collective takes on a link.

All sizes are bytes. "Shard" is one rank's padded FSDP shard of the units concerned."""

from __future__ import annotations


def fsdp_bytes(every_shard: float, regathered_shard: float, n: int, reshard: bool | int,
               secondary_shard: float = 0.0) -> tuple[float, float]:
    """(bytes over the n FSDP ranks, bytes inside the secondary groups) of one forward + backward:
    every unit all-gathered in forward and its gradient reduce-scattered, the units resharded after
    forward (`regathered_shard`) all-gathered again in backward; with a secondary partition of
    `reshard` ranks that regather runs inside groups of `reshard` (`secondary_shard`: the regathered
    units' shard over them)."""
    main = (n - 1) * (2 * every_shard + (regathered_shard if reshard is True else 0.0))
    secondary = (reshard - 1) * secondary_shard if not isinstance(reshard, bool) else 0.0
    return main, secondary


def replicate_bytes(shard: float, r: int) -> float:
    """HSDP / DDP: the all-reduce of each reduce-scattered gradient shard over r replicas."""
    return 2 * (r - 1) / r * shard


def tp_bytes(activation: float, t: int, dense_blocks: int, sparse_blocks: int, sequence_parallel: bool,
             embedding: bool, output: bool) -> float:
    """Megatron TP over t ranks, `activation` = bytes of one full (micro-batch x seq x dim) activation:
    per dense block an all-gather before and a reduce-scatter after attention and MLP in forward and
    the reverse in backward (without sequence parallelism an all-reduce in each place: the same
    bytes); a block whose MoE layer runs whole on every tp rank gathers its input in forward and the
    output's gradient in backward under sequence parallelism, and moves nothing for it otherwise; the
    embedding and output projection one forward and one backward collective each."""
    sparse = 6 if sequence_parallel else 4
    edges = 2 * (int(embedding) + int(output))
    return (t - 1) / t * activation * (8 * dense_blocks + sparse * sparse_blocks + edges)


def cp_bytes(local_kv: float, layers: int, cp: int, document_tokens: int = 0) -> float:
    """Context parallel: each layer all-gathers K and V (`local_kv` bytes of this rank's K + V) in
    forward and reduce-scatters their gradients in backward; with document masks the key positions
    (int64) and document ids (int32) of `document_tokens` local tokens are gathered once."""
    return (cp - 1) * (2 * layers * local_kv + document_tokens * 12)


def ep_bytes(routed: float, ep: int, moe_layers: int) -> float:
    """Expert parallel: per MoE layer the routed copies (`routed` bytes) go to their experts' ranks and
    back in forward, and their gradients both ways in backward; with balanced routing (ep - 1) / ep
    of them leave the rank."""
    return 4 * moe_layers * routed * (ep - 1) / ep


def collective_seconds(wire_bytes: float, collectives: float, gbps: float, latency_us: float) -> float:
    """Time of `collectives` collectives moving `wire_bytes` in all over a link of `gbps` GB/s."""
    return wire_bytes / (gbps * 1e9) + collectives * latency_us * 1e-6
