"""Preparing a corpus: documents tokenized by worker processes into shards that end at document
ends, each written atomically, with a progress file that lets an interrupted preparation resume.

Workers (forked from a server that imported only `titan.data.encoding`; one tokenizer each) encode chunks of documents with the
tokenizer's batch encoder; the chunks come back in order, so the shards do not depend on the number
of workers.
A shard closes at the first document end at or after ``shard_tokens`` tokens, is written as
``tokens-NNNNN.bin.tmp``, flushed and renamed; then ``progress.json`` (renamed into place too) records
it with the documents it holds. ``meta.json`` is written last: a folder without it is unfinished, and
the training recipe refuses it. A resume checks that the inputs are the same (files, sizes, times,
tokenizer, settings), keeps the finished shards, skips their documents without tokenizing them and
goes on.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from titan.checkpoint.manifest import ChecksumWriter
from titan.data.corpus import SHARD_FILE, SHARD_META, check_shard
from titan.data.encoding import Encoded, encode_documents, token_dtype
from titan.data.tokenizer import Tokenizer

PROGRESS = "progress.json"

@dataclass
class Progress:
    """What a preparation has written: its shards (each with its document count) and what it read."""

    fingerprint: dict
    shards: list[dict] = field(default_factory=list)

    @property
    def documents(self) -> int:
        return sum(s["documents"] for s in self.shards)

    def save(self, folder: Path) -> None:
        _write_atomically(folder / PROGRESS, json.dumps({"fingerprint": self.fingerprint, "shards": self.shards}))

    @staticmethod
    def load(folder: Path) -> Progress | None:
        try:
            saved = json.loads((folder / PROGRESS).read_text(encoding="utf-8"))
            return Progress(saved["fingerprint"], saved["shards"])
        except (OSError, ValueError, KeyError):
            return None


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


class ShardWriter:
    """Appends documents to shards that end at document ends; each finished shard is renamed into
    place and recorded in the progress file."""

    def __init__(self, folder: Path, shard_tokens: int, dtype: np.dtype, progress: Progress,
                 on_shard: Callable[[dict], None]):
        self.folder, self.shard_tokens, self.dtype, self.progress = folder, shard_tokens, dtype, progress
        self.on_shard = on_shard
        self.parts: list[np.ndarray] = []
        self.tokens = self.documents = 0

    def add(self, encoded: Encoded) -> None:
        ends = np.cumsum(encoded.lengths)
        start = doc = 0
        while doc < len(ends):
            # The first document end at which the shard reaches its size, or the chunk's end.
            need = self.shard_tokens - self.tokens
            close = int(np.searchsorted(ends, start + need, side="left"))
            if close >= len(ends):
                self._append(encoded.tokens[start:], len(ends) - doc)
                return
            end = int(ends[close])
            self._append(encoded.tokens[start:end], close + 1 - doc)
            self._finish()
            start, doc = end, close + 1

    def _append(self, tokens: np.ndarray, documents: int) -> None:
        if len(tokens):
            self.parts.append(tokens)
            self.tokens += len(tokens)
            self.documents += documents

    def _finish(self) -> None:
        name = SHARD_FILE.format(len(self.progress.shards))
        tmp = self.folder / (name + ".tmp")
        out = ChecksumWriter(tmp.open("wb"))
        try:
            for part in self.parts:
                out.write(np.ascontiguousarray(part, dtype=self.dtype))
            out.flush()
            os.fsync(out.fileno())
        finally:
            out.close()
        record = {"file": name, "tokens": self.tokens, **out.record(), "documents": self.documents}
        tmp.replace(self.folder / name)
        self.progress.shards.append(record)
        self.progress.save(self.folder)
        self.on_shard(record)
        self.parts, self.tokens, self.documents = [], 0, 0

    def close(self) -> None:
        if self.tokens:
            self._finish()


def resumable(folder: Path, fingerprint: dict) -> Progress | None:
    """The progress of an unfinished preparation of the same inputs in `folder`, its shards checked;
    None when there is none."""
    progress = Progress.load(folder)
    if progress is None or progress.fingerprint != fingerprint or (folder / SHARD_META).exists():
        return None
    itemsize = np.dtype(fingerprint["dtype"]).itemsize
    for shard in progress.shards:
        check_shard(folder / shard["file"], shard, itemsize, verify_checksum=False)
    return progress


def prepare(docs: Iterable[str], folder: Path, progress: Progress, spec: str, eot_token: str | None,
            workers: int, shard_tokens: int, tokenizer: Tokenizer,
            report: Callable[[int, int, int, int], None] = lambda docs, tokens, nbytes, shards: None,
            on_shard: Callable[[dict], None] = lambda shard: None) -> dict:
    """Tokenize `docs` (after the documents `progress` already holds) into `folder`; returns meta.json's
    content. `report(documents, tokens, text bytes, shards)` hears the running totals."""
    dtype = token_dtype(tokenizer.vocab_size)
    writer = ShardWriter(folder, shard_tokens, dtype, progress, on_shard)
    documents = progress.documents
    tokens = sum(s["tokens"] for s in progress.shards)
    nbytes = 0
    remaining = itertools.islice(docs, documents, None)  # finished shards' documents: read, not tokenized
    for encoded in encode_documents(remaining, spec, eot_token, workers):
        writer.add(encoded)
        documents += len(encoded.lengths)
        tokens += len(encoded.tokens)
        nbytes += encoded.text_bytes
        report(documents, tokens, nbytes, len(progress.shards))
    writer.close()
    shards = progress.shards
    meta = {"dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id, "tokenizer": spec,
            "num_tokens": sum(s["tokens"] for s in shards), "num_documents": documents, "shards": shards,
            "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_atomically(folder / SHARD_META, json.dumps(meta, indent=2))
    (folder / PROGRESS).unlink(missing_ok=True)
    return meta
