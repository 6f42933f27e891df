"""Tokenize a corpus once into token shards: `python -m recipes.prepare_data data=jsonl data.path=... out=<dir>`.

Documents stream from the source (text, JSON Lines plain / .gz / .zst, Parquet, a saved `datasets`
folder, pydoc) through `workers` tokenizer processes into ``tokens-NNNNN.bin`` shards of about
``shard_tokens`` tokens that end at document ends, and a ``meta.json`` written last (see
`titan.data.prepare`); the corpus is never held in memory. A progress bar shows documents, tokens and
MB/s. An interrupted preparation resumes where it stopped when run again with the same command
(finished shards are kept, their documents skipped untokenized); ``overwrite=true`` starts over.
Train on the result with ``python -m recipes.pretrain data=tokens data.path=<out>``.

    python -m recipes.prepare_data --mix <out> [<out> ...]   # print a data=mix config of prepared folders
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from recipes.cli import config_errors, fail, parse_args
from titan.config import ConfigError, DataConfig
from titan.data.checks import check_source, open_tokenizer
from titan.data.corpus import SHARD_META, SUFFIXES, corpus_files, iter_documents, read_shard_meta
from titan.data.encoding import token_dtype
from titan.data.prepare import PROGRESS, Progress, prepare, resumable
from titan.data.tokenizer import Tokenizer
from titan.fileio import inside


@dataclass
class PrepareDataConfig:
    data: DataConfig = field(default_factory=DataConfig)  # the corpus to tokenize and the tokenizer
    out: str = MISSING  # folder for the shards and meta.json
    shard_tokens: int = 50_000_000  # tokens per shard file, rounded up to the next document end
    overwrite: bool = False  # replace a non-empty `out` (a finished preparation, or an unfinished one of other inputs)
    workers: int = 0  # tokenizer processes; 0: one per core
    progress_bar: bool = True  # documents, tokens and MB/s while it runs (on a terminal)


def register_schema() -> None:
    """Register the schema so `configs/prepare_data.yaml` is typed and closed to unknown keys."""
    ConfigStore.instance().store(name="prepare_data_schema", node=PrepareDataConfig)


def check(cfg: PrepareDataConfig, out: Path) -> Tokenizer:
    """Validate the config before any work; returns the tokenizer."""
    d = cfg.data
    if cfg.shard_tokens <= 0:
        raise ConfigError("shard_tokens", f"must be positive, got {cfg.shard_tokens}.", "set shard_tokens=50000000.")
    if cfg.workers < 0:
        raise ConfigError("workers", f"must be 0 (one per core) or more, got {cfg.workers}.", "set workers=0.")
    if d.source not in ("pydoc", *SUFFIXES):
        raise ConfigError("data", f"source {d.source!r} cannot be tokenized.",
                          "use data=pydoc, data=text, data=jsonl, data=parquet or data=hf with data.path=<file|folder|glob>.")
    check_source(d)
    if out.exists() and not out.is_dir():
        raise ConfigError("out", f"{out} is a file.", "pick a folder path for out.")
    if out.is_dir():
        check_inputs_outside(d, out)
    return open_tokenizer(d)


def check_inputs_outside(d: DataConfig, out: Path) -> None:
    """Refuse an `out` that holds the corpus or the tokenizer: replacing it would delete them."""
    inputs = [*(corpus_files(d.source, d.path) if d.source in SUFFIXES else []),
              *([Path(d.tokenizer)] if d.tokenizer != "byte" else [])]
    held = next((f for f in inputs if inside(f, out)), None)
    if held:
        raise ConfigError("out", f"{out} holds {held}, an input of this run, which replacing {out} would delete.",
                          "pick an out folder that holds none of the corpus and tokenizer files.")


def fingerprint(cfg: PrepareDataConfig, tokenizer: Tokenizer) -> dict:
    """What a resume must find unchanged: the input files (sizes and times), the tokenizer and settings."""
    d = cfg.data

    def stamp(f: Path) -> list:
        stat = f.stat()
        return [str(f.resolve()), stat.st_size, stat.st_mtime_ns]

    inputs = [stamp(f) for f in corpus_files(d.source, d.path)] if d.source in SUFFIXES else [sys.version]
    return {"source": d.source, "inputs": inputs, "text_field": d.text_field, "eot_token": d.eot_token,
            "tokenizer": d.tokenizer if d.tokenizer == "byte" else stamp(Path(d.tokenizer)),
            "shard_tokens": cfg.shard_tokens, "dtype": token_dtype(tokenizer.vocab_size).name}


def start(cfg: PrepareDataConfig, out: Path, tokenizer: Tokenizer) -> Progress:
    """The progress to go on from: an unfinished preparation of the same inputs, or a fresh one."""
    prints = fingerprint(cfg, tokenizer)
    busy = out.is_dir() and any(out.iterdir())
    if busy and not cfg.overwrite:
        progress = resumable(out, prints)
        if progress is not None:
            print(f"resuming: {len(progress.shards)} finished shard(s), {progress.documents:,} documents kept", flush=True)
            return progress
        if (out / SHARD_META).exists():
            raise ConfigError("out", f"{out} holds a finished preparation.",
                              "pick a new out folder, or pass overwrite=true to replace it.")
        what = "an unfinished preparation of other inputs or settings" if (out / PROGRESS).exists() else "other files"
        raise ConfigError("out", f"{out} is not empty: it holds {what}.",
                          "pick a new out folder, or pass overwrite=true to replace it.")
    if busy:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return Progress(prints)


class ProgressBar:
    """Documents, tokens, MB/s and shards, on stderr (a terminal) or as a last line."""

    def __init__(self, enabled: bool):
        from rich.console import Console
        from rich.progress import Progress as RichProgress
        from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        self.began = time.perf_counter()
        self.bar = RichProgress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                                disable=not (enabled and console.is_terminal))
        self.task = self.bar.add_task("starting")
        self.bar.start()

    def update(self, documents: int, tokens: int, nbytes: int, shards: int) -> None:
        seconds = max(time.perf_counter() - self.began, 1e-9)
        self.bar.update(self.task, description=f"{documents:,} documents | {tokens:,} tokens | "
                        f"{nbytes / seconds / 1e6:.1f} MB/s | {tokens / seconds:,.0f} tokens/s | {shards} shards")

    def close(self) -> None:
        self.bar.stop()


def print_mixture(folders: list[str]) -> None:
    """A data=mix override (and its YAML) for prepared folders, weights by their tokens."""
    metas = []
    with config_errors():
        for i, folder in enumerate(folders):
            metas.append(read_shard_meta(folder, f"--mix argument {i + 1}"))
    names, seen = [], set()
    for folder in folders:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(folder).resolve().name) or "source"
        while name in seen:
            name += "_"
        seen.add(name)
        names.append(name)
    total = sum(m["num_tokens"] for m in metas)
    sources = [(n, str(Path(f).resolve()), m["num_tokens"] / total) for n, f, m in zip(names, folders, metas)]
    inline = ", ".join(f"{{name: {n}, path: {p}, weight: {w:.4f}}}" for n, p, w in sources)
    print(f"data=mix data.sources='[{inline}]'")
    print("# or in a data config (weights: each folder's share of the tokens; set your own):")
    print("source: mix\nsources:")
    for (n, p, w), m in zip(sources, metas):
        print(f"  - {{name: {n}, path: {p}, weight: {w:.4f}}}  # {m['num_tokens']:,} tokens")


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--mix":
        if len(argv) < 2:
            fail("--mix needs the prepared folders. Fix: python -m recipes.prepare_data --mix <out> [<out> ...].")
        print_mixture(argv[1:])
        return
    register_schema()
    raw = parse_args("prepare_data", argv)
    cfg: PrepareDataConfig = OmegaConf.to_object(raw)
    out = Path(cfg.out).expanduser().resolve()
    with config_errors():
        tokenizer = check(cfg, out)
        progress = start(cfg, out, tokenizer)
        d = cfg.data
        spec = d.tokenizer if d.tokenizer == "byte" else str(Path(d.tokenizer).resolve())
        workers = cfg.workers or os.cpu_count() or 1
        bar = ProgressBar(cfg.progress_bar)
        began = time.perf_counter()

        def shard_line(shard: dict) -> None:
            bar.bar.console.print(f"{shard['file']}: {shard['tokens']:,} tokens, {shard['documents']:,} documents",
                                  highlight=False)

        try:
            meta = prepare(iter_documents(d.source, d.path, d.text_field), out, progress, spec, d.eot_token, workers,
                           cfg.shard_tokens, tokenizer, bar.update, shard_line)
        finally:
            bar.close()
    seconds = time.perf_counter() - began
    print(f"done: {meta['num_tokens']:,} tokens ({meta['dtype']}, vocab {meta['vocab_size']}) of "
          f"{meta['num_documents']:,} documents in {len(meta['shards'])} shards under {out} "
          f"({seconds:.1f} s, {workers} worker(s))\n"
          f"train on them with: python -m recipes.pretrain data=tokens data.path={out} "
          f"(model.vocab_size must be at least {meta['vocab_size']})", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
