"""Document sources and the token stream they become.

Sources: ``pydoc`` (the Python documentation bundled with the standard library, real English text
that needs no network), local ``text`` files (one document per file), ``jsonl`` files (one document
per line) and ``tokens``: shards written by ``python -m recipes.prepare_data``, memory-mapped.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Sequence

import numpy as np

from titan.data.tokenizer import Tokenizer

SHARD_META = "meta.json"
SHARD_FILE = "tokens-{:05d}.bin"


def expand_paths(path: str, suffixes: tuple[str, ...]) -> list[Path]:
    """A file, a folder (searched recursively for `suffixes`) or a glob, sorted."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
    return sorted(Path(f) for f in glob.glob(path, recursive=True) if Path(f).is_file())


def iter_documents(source: str, path: str | None, text_field: str = "text") -> Iterator[str]:
    """Yield documents of a text source in a fixed order."""
    if source == "pydoc":
        from pydoc_data.topics import topics

        for key in sorted(topics):
            yield topics[key]
    elif source == "text":
        for f in expand_paths(path, (".txt", ".md")):
            yield f.read_text(encoding="utf-8", errors="replace")
    elif source == "jsonl":
        for f in expand_paths(path, (".jsonl", ".json")):
            with f.open(encoding="utf-8") as lines:
                for line in lines:
                    if line.strip():
                        yield json.loads(line)[text_field]
    else:
        raise ValueError(f"not a text source: {source}")


def tokenize_documents(docs: Iterator[str], tokenizer: Tokenizer, batch: int = 256) -> Iterator[np.ndarray]:
    """Token arrays of documents, each followed by the end-of-text token."""
    dtype = token_dtype(tokenizer.vocab_size)
    chunk: list[str] = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == batch:
            yield from _encode_chunk(chunk, tokenizer, dtype)
            chunk = []
    if chunk:
        yield from _encode_chunk(chunk, tokenizer, dtype)


def _encode_chunk(chunk: list[str], tokenizer: Tokenizer, dtype: np.dtype) -> Iterator[np.ndarray]:
    for ids in tokenizer.encode_batch(chunk):
        yield np.asarray(ids + [tokenizer.eot_id], dtype=dtype)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


class TokenStream:
    """Several token arrays read as one contiguous stream (arrays may be memory-mapped)."""

    def __init__(self, arrays: Sequence[np.ndarray]):
        self.arrays = [a for a in arrays if len(a)]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as int64, crossing array boundaries as needed."""
        parts = []
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop:
            base = int(self.offsets[shard])
            end = min(stop, int(self.offsets[shard + 1]))
            parts.append(self.arrays[shard][start - base:end - base])
            start, shard = end, shard + 1
        return np.concatenate(parts).astype(np.int64)


def load_token_shards(folder: str) -> tuple[TokenStream, dict]:
    """Memory-map the shards a prepare_data run wrote; returns the stream and its metadata."""
    meta = json.loads((Path(folder) / SHARD_META).read_text())
    arrays = [np.memmap(Path(folder) / s["file"], dtype=meta["dtype"], mode="r") for s in meta["shards"]]
    return TokenStream(arrays), meta


def write_token_shards(arrays: Iterable[np.ndarray], folder: Path, shard_tokens: int, tokenizer: Tokenizer,
                       tokenizer_spec: str, on_shard: Callable[[dict], None] = lambda shard: None) -> dict:
    """Write a token stream as `shard_tokens`-token raw arrays (the last may be shorter) plus the
    metadata :func:`load_token_shards` reads; files are flushed to disk. Returns the metadata."""
    dtype = token_dtype(tokenizer.vocab_size)
    shards: list[dict] = []
    out: BinaryIO | None = None
    try:
        for tokens in arrays:
            tokens = np.asarray(tokens, dtype=dtype)
            while len(tokens):
                if out is None:
                    shards.append({"file": SHARD_FILE.format(len(shards)), "tokens": 0})
                    out = (folder / shards[-1]["file"]).open("wb")
                part = tokens[:shard_tokens - shards[-1]["tokens"]]
                part.tofile(out)
                shards[-1]["tokens"] += len(part)
                tokens = tokens[len(part):]
                if shards[-1]["tokens"] == shard_tokens:
                    out = _finish_shard(out, shards[-1], on_shard)
        if out is not None:
            out = _finish_shard(out, shards[-1], on_shard)
    finally:
        if out is not None:  # an error mid-shard: the caller discards the folder
            out.close()
    meta = {"dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
            "tokenizer": tokenizer_spec, "num_tokens": sum(s["tokens"] for s in shards), "shards": shards}
    with (folder / SHARD_META).open("w", encoding="utf-8") as f:
        f.write(json.dumps(meta, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return meta


def _finish_shard(f: BinaryIO, shard: dict, on_shard: Callable[[dict], None]) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()
    on_shard(shard)


def build_stream(source: str, path: str | None, tokenizer: Tokenizer, text_field: str = "text") -> TokenStream:
    """The whole corpus as one token stream (text sources are tokenized in memory)."""
    if source == "tokens":
        return load_token_shards(path)[0]
    return TokenStream([np.concatenate(list(tokenize_documents(iter_documents(source, path, text_field), tokenizer)))])
