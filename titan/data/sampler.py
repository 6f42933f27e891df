"""Global-cursor sampler: one global order of sequences, sliced per data-parallel rank.

The order is a permutation that depends only on (seed, epoch), never materialized
(`titan.data.permutation.FeistelPermutation`: O(1) memory for any number of sequences). A cursor counts the sequences all
ranks together have consumed. Each optimizer step takes the next `global_batch_size` positions;
data-parallel rank ``r`` of ``d`` takes the ``r``-th contiguous slice of them and yields it in
micro-batches. The state ``{seed, epoch, consumed}`` is the same on every rank, so it resumes
exactly and can be re-sliced for another data-parallel size.

With a mixture (`titan.data.mixture`) the positions map to its sources instead, each source in its
own order; its anchor is part of the state.

Skipped ranges of global positions (``[start, end)``, from ``data.skip_ranges`` or a rollback past
bad data) are never drawn: a step takes the next `global_batch_size` positions outside them. They
are part of the state, so every resume and every layout honours them.
"""

from __future__ import annotations

import bisect
import itertools
from typing import Any, Iterable, Iterator

from parallel.mesh import report_once
from titan.config import ConfigError
from titan.data.mixture import MixtureOrder
from titan.data.permutation import FeistelPermutation


class GlobalCursorSampler:
    """Batch sampler yielding this rank's micro-batches of window indices, forever."""

    def __init__(self, num_sequences: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, shuffle: bool = True, new_seed: bool = False,
                 mixture: MixtureOrder | None = None):
        """`mixture`: the positions map to a weighted mixture of sources (keys of `MixedWindows`)."""
        if num_sequences < 1:
            raise ValueError("the dataset has no sequences")
        self.num_sequences = num_sequences
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.local_batch_size = global_batch_size // dp_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.new_seed = new_seed  # a loaded state with another seed keeps its cursor and takes this seed
        self.consumed = 0  # the global position after the last sequence of the completed steps
        self.skip: list[tuple[int, int]] = []  # sorted, disjoint [start, end) ranges of positions never drawn
        self.mixture = mixture
        self._cached_epoch: int | None = None
        self._order: FeistelPermutation | None = None

    def epoch_order(self, epoch: int) -> FeistelPermutation | None:
        """The order of epoch `epoch` (None: stream order)."""
        if not self.shuffle:
            return None
        if self._cached_epoch != epoch:
            self._order = FeistelPermutation(self.num_sequences, self.seed, epoch)
            self._cached_epoch = epoch
        return self._order

    def ids_at(self, positions: Iterable[int]) -> list[int]:
        """Sequence ids at these global positions, across epoch ends."""
        if self.mixture is not None:
            return self.mixture.ids_at(positions)
        out = []
        for epoch, offsets in _by_epoch(positions, self.num_sequences):
            order = self.epoch_order(epoch)
            out.extend(offsets if order is None else order(offsets).tolist())
        return out

    def skip_ranges(self, ranges: Iterable[Iterable[int]]) -> None:
        """Never draw the positions in these [start, end) ranges (merged with those skipped already)."""
        merged: list[tuple[int, int]] = []
        for start, end in sorted([*self.skip, *((int(a), int(b)) for a, b in ranges)]):
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            elif start < end:
                merged.append((start, end))
        self.skip = merged

    def step_positions(self, consumed: int) -> list[int]:
        """The global positions of the batch that starts at `consumed`: the next global_batch_size
        positions outside the skipped ranges."""
        positions: list[int] = []
        pos = consumed
        starts = [start for start, _ in self.skip]
        while len(positions) < self.global_batch_size:
            i = bisect.bisect_right(starts, pos) - 1
            if i >= 0 and pos < self.skip[i][1]:
                pos = self.skip[i][1]
                continue
            positions.append(pos)
            pos += 1
        return positions

    def step_indices(self, consumed: int) -> list[int]:
        """This rank's slice of the global batch that starts at `consumed`."""
        mine = self.step_positions(consumed)[self.dp_rank * self.local_batch_size:][:self.local_batch_size]
        return self.ids_at(mine)

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            local = self.step_indices(self.consumed)
            micro = [local[s:s + self.micro_batch_size] for s in range(0, self.local_batch_size, self.micro_batch_size)]
            # The cursor moves before the step's last micro-batch leaves, so a state taken
            # at a step boundary already counts the finished step.
            self.consumed = self.step_positions(self.consumed)[-1] + 1
            yield from micro

    def __len__(self) -> int:
        return 2**62  # endless: training length is set by training.steps

    def state_dict(self) -> dict[str, Any]:
        state = {"seed": self.seed, "epoch": self.consumed // self.num_sequences, "consumed": self.consumed,
                 "skip": [list(r) for r in self.skip]}
        return {**state, **self.mixture.state_dict(self.consumed)} if self.mixture is not None else state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed and not self.new_seed:
            raise ValueError(f"data order seed {state['seed']} != training.seed {self.seed}")
        self.consumed = int(state["consumed"])
        self.skip_ranges(state.get("skip", []))
        if self.mixture is not None:
            if "mix" not in state:
                raise ConfigError("data.source", "the checkpoint's data cursor is of a single source; this run draws "
                                  "a mixture (data=mix).", "resume with the checkpoint's data config, or start a new "
                                  "run.dir for the mixture.")
            notice = self.mixture.load_state_dict(state, self.consumed)
            if notice:
                report_once(notice)


def _by_epoch(positions: Iterable[int], n: int) -> Iterator[tuple[int, list[int]]]:
    """(epoch, offsets in it) of consecutive runs of `positions` in the same epoch."""
    for epoch, group in itertools.groupby(positions, key=lambda pos: pos // n):
        yield epoch, [pos - epoch * n for pos in group]
