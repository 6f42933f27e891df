"""Packed training windows: the token stream cut into `seq_len + 1` windows.

Window ``i`` covers tokens ``[i * seq_len, i * seq_len + seq_len + 1)``: inputs are its first
``seq_len`` tokens and targets its last ``seq_len``, so every token of the stream is predicted once.
Documents are already joined by end-of-text tokens, so windows cross document boundaries.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from titan.data.corpus import TokenStream


class PackedWindows(Dataset):
    """Windows of a token range [start, stop) of a stream; item = (window id, tokens)."""

    def __init__(self, stream: TokenStream, start: int, stop: int, seq_len: int):
        self.stream, self.start, self.seq_len = stream, start, seq_len
        self.num_windows = max(0, (stop - start - 1) // seq_len)

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_windows:
            raise IndexError(index)
        begin = self.start + index * self.seq_len
        tokens = torch.from_numpy(self.stream.read(begin, begin + self.seq_len + 1))
        return {"tokens": tokens, "ids": torch.tensor(index)}


def train_eval_split(stream: TokenStream, seq_len: int, eval_fraction: float) -> tuple[PackedWindows, PackedWindows]:
    """The held-out split is the tail `eval_fraction` of the token stream."""
    boundary = int(len(stream) * (1.0 - eval_fraction))
    return PackedWindows(stream, 0, boundary, seq_len), PackedWindows(stream, boundary, len(stream), seq_len)
