"""A weighted mixture of token sources, drawn in set proportions with each source's own order.

The global positions of the data cursor are cut into blocks of `block` positions (the global batch
when the run began), so with no skipped positions a step's batch is one block. Block ``j`` takes
``count_s(j)`` sequences from source ``s``: the largest-remainder rounding of ``w_s x block`` plus
what earlier blocks owe the source (its deficit), so counts match the weights within one sequence in
every block and the cumulative counts never drift by a whole sequence. Inside a block the sources'
sequences are interleaved by a seeded permutation of the block (every data-parallel rank sees a
mix). Source ``s`` reads its own positions ``drawn_s, drawn_s + 1, ...`` through its own seeded
order (a fresh Feistel permutation per epoch of that source), so each source is exactly-once per
epoch whatever the layout and across resumes. A source whose ``max_epochs`` is reached drops out and
the others share its weight.

Everything is a function of the anchor state (block index, drawn counts, deficits, weights), which
is saved with the data cursor; a resume with other weights keeps the counts drawn so far and applies
the new weights from the first block not yet begun.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch.utils.data import Dataset

from titan.config import ConfigError
from titan.data.packing import PackedWindows
from titan.data.permutation import FeistelPermutation

BLOCK_SALT = 0x6D6978  # keys the in-block interleaving apart from the sources' orders


@dataclass(frozen=True)
class MixSource:
    name: str
    size: int  # train windows
    weight: float
    max_epochs: float | None = None  # stop drawing after this many passes; None: repeat forever

    @property
    def cap(self) -> float:
        return math.inf if self.max_epochs is None else math.floor(self.max_epochs * self.size)


def apportion(total: int, shares: list[float]) -> list[int]:
    """Non-negative integers summing to `total`, each the floor or ceiling of its share (the shares
    sum to `total`, a share may be a little below zero), remainders to the largest fractions (ties:
    the first source)."""
    counts = [max(0, math.floor(x)) for x in shares]
    missing = total - sum(counts)
    by_fraction = sorted(range(len(shares)), key=lambda s: (-(shares[s] - counts[s]), s))
    for s in by_fraction[:max(0, missing)]:
        counts[s] += 1
    for s in [s for s in reversed(by_fraction) if counts[s] > 0][:max(0, -missing)]:
        counts[s] -= 1
    return counts


@dataclass
class Anchor:
    """Where the schedule stands at the start of block `block`."""

    block: int
    drawn: list[int]  # sequences drawn from each source before the block
    deficit: list[float]  # what earlier blocks owe each source (its share minus what it got)
    weights: list[float]


@dataclass(frozen=True)
class Block:
    drawn: list[int]  # sequences drawn from each source before the block
    deficit: list[float]  # what earlier blocks owe each source
    counts: list[int]  # sequences the block takes from each source
    deficit_after: list[float]


class MixtureOrder:
    """Global positions -> keys (`offset of the source + window id`) of a weighted mixture."""

    KEPT_BLOCKS = 16  # recent blocks remembered (positions are asked for near the cursor)

    def __init__(self, sources: list[MixSource], block: int, seed: int):
        self.sources, self.block, self.seed = sources, block, seed
        self.offsets = np.cumsum([0] + [s.size for s in sources])[:-1].tolist()
        self._salts = [zlib.crc32(s.name.encode()) for s in sources]
        self._set_anchor(Anchor(0, [0] * len(sources), [0.0] * len(sources), [s.weight for s in sources]))

    def _set_anchor(self, anchor: Anchor) -> None:
        self._anchor = anchor
        self._blocks: dict[int, Block] = {}
        self._orders: dict[tuple[int, int], FeistelPermutation] = {}

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def source_of(self, keys: np.ndarray) -> np.ndarray:
        """The source index of each key."""
        return np.searchsorted(self.offsets, keys, side="right") - 1

    def counts(self, block: int) -> list[int]:
        """Sequences block `block` takes from each source."""
        return self._block(block).counts

    def _block(self, block: int) -> Block:
        if block < self._anchor.block:
            raise IndexError(f"block {block} precedes the mixture's anchor block {self._anchor.block}")
        if block not in self._blocks:
            known = [j for j in self._blocks if j < block]
            if known:
                j = max(known)
                prev = self._blocks[j]
                drawn, deficit = [d + c for d, c in zip(prev.drawn, prev.counts)], prev.deficit_after
                j += 1
            else:
                j, drawn, deficit = self._anchor.block, self._anchor.drawn, self._anchor.deficit
            while j <= block:
                counts, after = self._allocate(j, drawn, deficit, self._anchor.weights)
                self._blocks[j] = Block(drawn, deficit, counts, after)
                self._blocks.pop(j - self.KEPT_BLOCKS, None)
                drawn, deficit, j = [d + c for d, c in zip(drawn, counts)], after, j + 1
            for old in [j for j in self._blocks if abs(j - block) > self.KEPT_BLOCKS]:
                del self._blocks[old]
        return self._blocks[block]

    def _allocate(self, block: int, drawn: list[int], deficit: list[float], weights: list[float]
                  ) -> tuple[list[int], list[float]]:
        """(counts of `block`, deficits after it): sources at their cap take what is left of it and
        drop out, the others share the rest by weight."""
        deficit = list(deficit)
        after = [0.0] * len(self.sources)
        counts = [0] * len(self.sources)
        active = [s for s, src in enumerate(self.sources) if drawn[s] < src.cap and weights[s] > 0]
        remaining = self.block
        while remaining and active:
            total = sum(weights[s] for s in active)
            owed = sum(deficit[s] for s in active)  # non-zero once a source has dropped out
            shares = [(remaining - owed) * weights[s] / total + deficit[s] for s in active]
            wanted = apportion(remaining, shares)
            room = {s: self.sources[s].cap - drawn[s] for s in active}
            capped = [s for s, n in zip(active, wanted) if n >= room[s]]
            if not capped:
                for s, n, share in zip(active, wanted, shares):
                    counts[s], after[s] = n, share - n
                remaining = 0
                break
            for s in capped:
                counts[s] = int(room[s])
                remaining -= counts[s]
                deficit[s] = 0.0
            active = [s for s in active if s not in capped]
        if remaining:
            sources = ", ".join(f"{s.name} ({s.max_epochs} epochs of {s.size:,} windows)" for s in self.sources)
            raise ConfigError("data.sources", f"every source of the mixture reached its max_epochs by global position "
                              f"{(block + 1) * self.block - remaining:,}: {sources}.",
                              "raise data.sources[*].max_epochs (or leave it unset to repeat), add sources, or "
                              "lower training.steps.")
        return counts, after

    def _order(self, source: int, epoch: int) -> FeistelPermutation:
        key = (source, epoch)
        if key not in self._orders:
            if len(self._orders) >= 4 * len(self.sources):
                self._orders.clear()
            self._orders[key] = FeistelPermutation(self.sources[source].size, self.seed, self._salts[source], epoch)
        return self._orders[key]

    def ids_at(self, positions: Iterable[int]) -> list[int]:
        """The keys at these global positions."""
        positions = np.asarray(list(positions), dtype=np.int64)
        out = np.empty(len(positions), dtype=np.int64)
        blocks = positions // self.block
        for block in np.unique(blocks):
            here = blocks == block
            b = self._block(int(block))
            slots = FeistelPermutation(self.block, self.seed, BLOCK_SALT, int(block))(positions[here] % self.block)
            starts = np.cumsum([0] + b.counts)
            source = np.searchsorted(starts, slots, side="right") - 1
            keys = np.empty(len(slots), dtype=np.int64)
            for s in np.unique(source):
                mine = source == s
                drawn = b.drawn[s] + slots[mine] - starts[s]
                epochs, windows = np.divmod(drawn, self.sources[s].size)
                for epoch in np.unique(epochs):
                    same = epochs == epoch
                    picked = keys[mine]
                    picked[same] = self.offsets[s] + self._order(int(s), int(epoch))(windows[same])
                    keys[mine] = picked
            out[here] = keys
        return out.tolist()

    def state_dict(self, consumed: int) -> dict[str, Any]:
        """The anchor at the block holding position `consumed` (the next one drawn)."""
        block = consumed // self.block
        b = self._block(block)
        return {"mix": {"names": self.names, "block_size": self.block, "block": block, "drawn": list(b.drawn),
                        "deficit": list(b.deficit), "weights": list(self._anchor.weights)}}

    def load_state_dict(self, state: dict[str, Any], consumed: int) -> str | None:
        """Go on from a saved anchor; returns a line to log when the weights changed (they apply from
        the first block not yet begun)."""
        mix = state["mix"]
        if mix["names"] != self.names:
            raise ConfigError("data.sources", f"the checkpoint's mixture has the sources {mix['names']}, this run "
                              f"{self.names}.", "resume with the same sources (names and order); weights may change.")
        self.block = int(mix["block_size"])
        saved = [float(w) for w in mix["weights"]]
        self._set_anchor(Anchor(int(mix["block"]), [int(d) for d in mix["drawn"]], [float(d) for d in mix["deficit"]],
                                saved))
        new = [s.weight for s in self.sources]
        if new == saved:
            return None
        start = self._anchor.block
        if consumed % self.block:  # the block under way keeps the weights it began with
            b = self._block(start)
            self._set_anchor(Anchor(start + 1, [d + c for d, c in zip(b.drawn, b.counts)], [0.0] * len(new), new))
        else:
            self._set_anchor(Anchor(start, self._anchor.drawn, [0.0] * len(new), new))
        return (f"data mixture weights changed from {saved} to {new}: they apply from global position "
                f"{self._anchor.block * self.block:,}")


class MixedWindows(Dataset):
    """The windows of several sources under one key space: key = offset of the source + window id;
    an item also says its source (index into `names`)."""

    def __init__(self, parts: list[PackedWindows], names: list[str]):
        self.parts, self.names = parts, names
        self.offsets = np.cumsum([0] + [len(p) for p in parts]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        source = int(np.searchsorted(self.offsets, key, side="right")) - 1
        if not 0 <= source < len(self.parts):
            raise IndexError(key)
        item = self.parts[source][key - self.offsets[source]]
        return {**item, "ids": torch.tensor(key), "source": torch.tensor(source)}
