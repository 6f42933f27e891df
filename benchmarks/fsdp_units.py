"""The FSDP units `parallel.data_parallel.apply_fsdp` makes of the framework's Llama, with the
parameter shapes the benchmarks' closed forms need.

Forward order: the embedding, each block, the head (final norm + output projection), the root (what
is left). Units resharded after forward are gathered again in backward: the embedding and every
block but the last. The last block, the head and the root stay gathered from forward through
backward. With tied embeddings the shared weight and the final norm stay in the root.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Shapes = list[tuple[int, ...]]


@dataclass
class Units:
    regathered: list[Shapes]  # resharded after forward, all-gathered again in backward
    kept: list[Shapes]  # gathered from forward through backward

    @property
    def all(self) -> list[Shapes]:
        return [*self.regathered, *self.kept]

    def shard_bytes(self, k: int, regathered_only: bool = False) -> int:
        """Padded fp32 bytes of one shard over k ranks, summed over the units."""
        return sum(shard_bytes(u, k) for u in (self.regathered if regathered_only else self.all))

    def params(self) -> int:
        return sum(math.prod(s) for unit in self.all for s in unit)


def shard_bytes(shapes: Shapes, k: int) -> int:
    """Padded fp32 shard bytes of these parameters over k ranks (dim 0 split in ceil(d0 / k) rows)."""
    return sum(math.ceil(s[0] / k) * math.prod(s[1:]) * 4 for s in shapes)


def fsdp_units(model) -> Units:
    """The units of a `titan.models.Llama` (built on meta), as `apply_fsdp` wraps them."""
    plan = model.plan()
    blocks = list(model.get_submodule(plan.blocks).values())
    shapes = [[tuple(p.shape) for p in block.parameters()] for block in blocks]
    if plan.tied:
        in_blocks = {id(p) for block in blocks for p in block.parameters()}
        root = [tuple(p.shape) for p in model.parameters() if id(p) not in in_blocks]
        return Units(shapes[:-1], [shapes[-1], root])
    embedding = [tuple(p.shape) for p in model.get_submodule(plan.embedding).parameters()]
    head = [tuple(p.shape) for name in (plan.final_norm, plan.output) for p in model.get_submodule(name).parameters()]
    return Units([embedding, *shapes[:-1]], [shapes[-1], head])


def model_units(overrides: list[str]):
    """The composed model config and its FSDP units, for recipe overrides (e.g. `model=small`)."""
    from omegaconf import OmegaConf

    from recipes.cli import compose_config
    from titan.config import register_schemas
    from titan.models import build_model

    register_schemas()
    cfg = OmegaConf.to_object(compose_config("pretrain", overrides))
    return cfg, fsdp_units(build_model(cfg.model))
