"""Packed training windows: the token stream cut into `seq_len + 1` windows.

Window ``i`` covers tokens ``[i * seq_len, i * seq_len + seq_len + 1)``: inputs are its first
``seq_len`` tokens and targets its last ``seq_len``, so every token of the stream is predicted once.
Documents are already joined by end-of-text tokens, so windows cross document boundaries; with
document masking, :func:`document_ids` tells the model where they are (each end-of-text token
belongs to the document it ends) and :func:`positions_in_documents` restarts positions at each.
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


def document_ids(tokens: torch.Tensor, eot_id: int) -> torch.Tensor:
    """(batch, seq) index of each token's document within its window: the end-of-text tokens before it."""
    ends = (tokens == eot_id).to(torch.int32)
    return torch.cumsum(ends, dim=-1, dtype=torch.int32) - ends


def positions_in_documents(documents: torch.Tensor) -> torch.Tensor:
    """(batch, seq) position of each token within its document (0 at a document's first token)."""
    index = torch.arange(documents.shape[-1], device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[..., 1:] = documents[..., 1:] != documents[..., :-1]
    return index - torch.cummax(torch.where(starts, index, 0), dim=-1).values
