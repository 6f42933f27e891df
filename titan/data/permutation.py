"""A seeded permutation of [0, n) that is never materialized: O(1) memory for any n.

A balanced Feistel network over the smallest domain of 2^(2h) >= n values is a bijection on that
domain for any round function; walking the cycle (applying it again while the value is >= n) turns
it into a bijection on [0, n) (the domain is under 4 n, so a lookup takes under 4 walks on average).
Round keys come from (seed, epoch) through splitmix64, the round function is splitmix64's finalizer
of the half and the key. Lookups are vectorized with numpy's wrapping uint64 arithmetic.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 6
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (a bijective avalanche of 64 bits)."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def round_keys(*words: int, rounds: int = ROUNDS) -> np.ndarray:
    """`rounds` 64-bit keys drawn from the integers `words` (e.g. seed, epoch)."""
    state = np.uint64(0)
    with np.errstate(over="ignore"):
        for word in words:
            state = _mix(np.asarray(state ^ np.uint64(word % 2**64) + _GOLDEN, dtype=np.uint64))
        return np.array([_mix(np.asarray(state + _GOLDEN * np.uint64(r + 1), dtype=np.uint64))
                         for r in range(rounds)], dtype=np.uint64)


class FeistelPermutation:
    """`perm[i]` for i in [0, n): a bijection seeded by `words` (e.g. seed and epoch)."""

    def __init__(self, n: int, *words: int):
        if n < 1:
            raise ValueError("a permutation needs n >= 1")
        self.n = n
        half_bits = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
        self.half_bits = np.uint64(half_bits)
        self.half_mask = np.uint64((1 << half_bits) - 1)
        self.keys = round_keys(*words)

    def _network(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half_bits, x & self.half_mask
        with np.errstate(over="ignore"):
            for key in self.keys:
                left, right = right, left ^ (_mix(right ^ key) & self.half_mask)
        return (left << self.half_bits) | right

    def __call__(self, indices: np.ndarray | list[int]) -> np.ndarray:
        """The images of `indices` (each in [0, n)) as int64."""
        x = np.asarray(indices, dtype=np.uint64)
        if x.size and int(x.max()) >= self.n:
            raise IndexError(f"index {int(x.max())} out of range for a permutation of {self.n}")
        out = self._network(x)
        walking = out >= self.n
        while walking.any():  # cycle-walk back into [0, n)
            out[walking] = self._network(out[walking])
            walking = out >= self.n
        return out.astype(np.int64)

    def __getitem__(self, index: int) -> int:
        return int(self(np.array([index]))[0])
