"""What one pp rank holds: its stages' blocks and the FSDP units they make, with equal units
counted once (the search asks for the same ranks many times, so the answers are kept)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from titan.planner.facts import Block, ModelFacts, Unit, unit_elements
from titan.planner.layout import PlannedLayout


@dataclass(frozen=True)
class Stage:
    blocks: tuple[Block, ...]
    first: bool  # holds the embedding
    last: bool  # holds the final norm, the output and the loss


@dataclass(frozen=True)
class RankParts:
    stages: tuple[Stage, ...]
    units: tuple[tuple[Unit, bool, int], ...]  # (unit, is an experts unit, how many), in FSDP's terms
    kept: tuple[tuple[Unit, bool, int], ...]  # the units FSDP keeps unsharded from forward to backward

    @property
    def blocks(self) -> list[Block]:
        return [b for s in self.stages for b in s.blocks]

    def regathered(self) -> list[tuple[Unit, bool, int]]:
        """The units resharded after forward and gathered again in backward, with their counts."""
        kept = {(id(u), e): n for u, e, n in self.kept}
        return [(u, e, n - kept.get((id(u), e), 0)) for u, e, n in self.units if n > kept.get((id(u), e), 0)]


def shard_elements(units: Iterable[tuple[Unit, bool, int]], tp: int, ep: int, shards: int) -> int:
    """Elements of one rank's shards over `shards` ranks of these (unit, is experts, how many)."""
    return sum(n * unit_elements(u, tp, ep, shards) for u, _, n in units)


def stage_units(facts: ModelFacts, stage: Stage) -> list[tuple[Unit, bool, bool]]:
    """(unit, is an experts unit, kept unsharded from forward to backward) of one stage as
    `apply_fsdp` wraps them, in forward order: the embedding and every block but the last are
    resharded after forward; the last block, the head and the root are kept."""
    units = [(facts.embedding, False, False)] if stage.first and facts.embedding else []
    for position, block in enumerate(stage.blocks):
        last = position == len(stage.blocks) - 1
        units.append((block.params, False, last))
        if block.experts:
            units.append((block.experts, True, last))
    if stage.last and facts.head:
        units.append((facts.head, False, True))
    if facts.root and (stage.first or stage.last):
        units.append((facts.root, False, True))
    return units


_PARTS: dict[tuple, RankParts] = {}


def rank_parts(facts: ModelFacts, layout: PlannedLayout, pp_rank: int) -> RankParts:
    key = (id(facts), layout.pipeline, pp_rank)
    if key not in _PARTS:
        n = facts.cfg.n_layers
        stages = tuple(Stage(tuple(facts.blocks[i] for i in layers), layout.holds_first(pp_rank) and 0 in layers,
                             layout.holds_last(pp_rank) and n - 1 in layers) for layers in layout.stages(pp_rank))
        every, kept = Counter(), Counter()
        units: dict[tuple[int, bool], Unit] = {}
        for stage in stages:
            for unit, expert, keep in stage_units(facts, stage):
                units[(id(unit), expert)] = unit
                every[(id(unit), expert)] += 1
                kept[(id(unit), expert)] += keep
        _PARTS[key] = RankParts(stages, tuple((units[k], k[1], c) for k, c in every.items()),
                                tuple((units[k], k[1], c) for k, c in kept.items() if c))
    return _PARTS[key]
