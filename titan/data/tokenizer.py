"""Tokenizers: byte-level (no files) and any Hugging Face ``tokenizer.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

KNOWN_EOT_TOKENS = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|eot_id|>")


class Tokenizer(Protocol):
    vocab_size: int
    eot_id: int

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; id 256 ends a document."""

    vocab_size = 257
    eot_id = 256
    name = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` model loaded from a ``tokenizer.json`` file."""

    def __init__(self, path: str, eot_token: str | None = None):
        from tokenizers import Tokenizer as _Tokenizer

        self.name = str(path)
        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception
            raise ValueError(f"cannot read tokenizer {path}: {exc}") from exc
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        candidates = (eot_token,) if eot_token else KNOWN_EOT_TOKENS
        ids = [self._tok.token_to_id(t) for t in candidates]
        found = [i for i in ids if i is not None]
        if not found:
            raise KeyError(f"none of the end-of-text tokens {candidates} is in {path}")
        self.eot_id = found[0]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # The fast batch encode skips the character offsets, which nothing here reads (same ids).
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))


def load_tokenizer(spec: str, eot_token: str | None = None) -> Tokenizer:
    """`spec` is "byte" or a path to a tokenizer.json (or a folder holding one)."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    return HFTokenizer(str(path), eot_token)
