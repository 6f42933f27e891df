"""Tokenizing chunks of documents, in this process or in tokenizer worker processes.

Kept light (numpy and the tokenizer only): workers fork from a server that imported this module alone.
Chunks go to the pool from the calling thread with a bounded number in flight, so an error while
reading the documents surfaces there (and ends the pool) instead of in the pool's feeder thread.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import multiprocessing
import os
import sys
import types
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from titan.data.tokenizer import Tokenizer, load_tokenizer

IN_FLIGHT_PER_WORKER = 2

_worker_tokenizer: Tokenizer | None = None


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


@dataclass
class Encoded:
    """A chunk of documents as tokens: all of them back to back, each ending with end-of-text."""

    tokens: np.ndarray
    lengths: np.ndarray  # tokens per document
    text_bytes: int  # UTF-8 bytes of the chunk's text


def _init_worker(spec: str, eot_token: str | None) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _worker_tokenizer = load_tokenizer(spec, eot_token)


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Hide the caller's ``__main__`` while workers start: forkserver (like spawn) re-imports it in every
    worker, and a recipe's main module imports torch (1.5 s a worker, all of it before the first chunk)."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def encode_chunk(docs: list[str], tokenizer: Tokenizer | None = None) -> Encoded:
    tokenizer = tokenizer or _worker_tokenizer
    ids = tokenizer.encode_batch(docs)
    for doc in ids:
        doc.append(tokenizer.eot_id)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=token_dtype(tokenizer.vocab_size),
                         count=int(lengths.sum()))
    return Encoded(tokens, lengths, sum(len(d.encode("utf-8", "surrogateescape")) for d in docs))


def chunked(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(docs)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def encode_documents(docs: Iterable[str], spec: str, eot_token: str | None, workers: int,
                     chunk_docs: int = 256) -> Iterator[Encoded]:
    """The documents' tokens, chunk by chunk in document order, from `workers` processes (1: here)."""
    if workers <= 1:
        tokenizer = load_tokenizer(spec, eot_token)
        for chunk in chunked(docs, chunk_docs):
            yield encode_chunk(chunk, tokenizer)
        return
    # A fork server that has imported only this module: workers start in milliseconds and never import
    # the caller's modules (spawn would re-import the recipe, and torch with it, in every worker).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    with _main_module_hidden():
        pool = context.Pool(workers, initializer=_init_worker, initargs=(spec, eot_token))
    with pool:
        pending: collections.deque = collections.deque()
        for chunk in chunked(docs, chunk_docs):
            pending.append(pool.apply_async(encode_chunk, (chunk,)))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
