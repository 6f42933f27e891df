"""Global-cursor sampler: one global order of sequences, sliced per data-parallel rank.

The order is a permutation that depends only on (seed, epoch). A cursor counts the sequences all
ranks together have consumed. Each optimizer step takes the next `global_batch_size` positions;
data-parallel rank ``r`` of ``d`` takes the ``r``-th contiguous slice of them and yields it in
micro-batches. The state ``{seed, epoch, consumed}`` is the same on every rank, so it resumes
exactly and can be re-sliced for another data-parallel size.

Skipped ranges of global positions (``[start, end)``, from ``data.skip_ranges`` or a rollback past
bad data) are never drawn: a step takes the next `global_batch_size` positions outside them. They
are part of the state, so every resume and every layout honours them.
"""

from __future__ import annotations

import bisect
from typing import Any, Iterable, Iterator

import torch


class GlobalCursorSampler:
    """Batch sampler yielding this rank's micro-batches of window indices, forever."""

    def __init__(self, num_sequences: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, shuffle: bool = True, new_seed: bool = False):
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
        self._cached_epoch: int | None = None
        self._order: torch.Tensor | None = None

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if self._cached_epoch != epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._order = torch.randperm(self.num_sequences, generator=gen)
            else:
                self._order = torch.arange(self.num_sequences)
            self._cached_epoch = epoch
        return self._order

    def global_indices(self, start: int, count: int) -> list[int]:
        """Sequence ids at global positions [start, start + count), across epoch ends."""
        out = []
        for pos in range(start, start + count):
            epoch, offset = divmod(pos, self.num_sequences)
            out.append(int(self.epoch_order(epoch)[offset]))
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
        return [self.global_indices(pos, 1)[0] for pos in mine]

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
        return {"seed": self.seed, "epoch": self.consumed // self.num_sequences, "consumed": self.consumed,
                "skip": [list(r) for r in self.skip]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed and not self.new_seed:
            raise ValueError(f"data order seed {state['seed']} != training.seed {self.seed}")
        self.consumed = int(state["consumed"])
        self.skip_ranges(state.get("skip", []))
