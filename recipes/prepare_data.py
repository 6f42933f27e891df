"""Tokenize a corpus once into token shards: `python -m recipes.prepare_data data=jsonl data.path=... out=<dir>`.

Documents stream from the source through the tokenizer into ``tokens-NNNNN.bin`` files of
``shard_tokens`` tokens and a ``meta.json`` (see :func:`titan.data.corpus.write_token_shards`); the
corpus is never held in memory. Everything is written into a temporary folder beside ``out`` and
renamed into place at the end, so a crash never leaves a half-written ``out``. Train on the result
with ``python -m recipes.pretrain data=tokens data.path=<out>``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from recipes.cli import config_errors, parse_args
from titan.config import ConfigError, DataConfig
from titan.data.checks import check_source, open_tokenizer
from titan.data.corpus import SUFFIXES, corpus_files, iter_documents, tokenize_documents, write_token_shards
from titan.data.tokenizer import Tokenizer
from titan.fileio import inside, staged


@dataclass
class PrepareDataConfig:
    data: DataConfig = field(default_factory=DataConfig)  # the corpus to tokenize and the tokenizer
    out: str = MISSING  # folder for the shards and meta.json
    shard_tokens: int = 50_000_000  # tokens per shard file
    overwrite: bool = False  # replace a non-empty `out`


def register_schema() -> None:
    """Register the schema so `configs/prepare_data.yaml` is typed and closed to unknown keys."""
    ConfigStore.instance().store(name="prepare_data_schema", node=PrepareDataConfig)


def check(cfg: PrepareDataConfig, out: Path) -> Tokenizer:
    """Validate the config before any work; returns the tokenizer."""
    d = cfg.data
    if cfg.shard_tokens <= 0:
        raise ConfigError("shard_tokens", f"must be positive, got {cfg.shard_tokens}.", "set shard_tokens=50000000.")
    if d.source not in ("pydoc", *SUFFIXES):
        raise ConfigError("data", f"source {d.source!r} cannot be tokenized.",
                          "use data=pydoc, data=text or data=jsonl with data.path=<file|folder|glob>.")
    check_source(d)
    if out.exists() and not out.is_dir():
        raise ConfigError("out", f"{out} is a file.", "pick a folder path for out.")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError("out", f"{out} already exists and is not empty.",
                          "pick a new out folder, or pass overwrite=true to replace it.")
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


def write_shards(cfg: PrepareDataConfig, tokenizer: Tokenizer, folder: Path) -> dict:
    """Stream the corpus through the tokenizer into `folder`; returns the metadata."""
    d = cfg.data
    spec = d.tokenizer if d.tokenizer == "byte" else str(Path(d.tokenizer).resolve())
    docs = iter_documents(d.source, d.path, d.text_field)

    def report(shard: dict) -> None:
        print(f"{shard['file']}: {shard['tokens']:,} tokens", flush=True)

    return write_token_shards(tokenize_documents(docs, tokenizer), folder, cfg.shard_tokens, tokenizer, spec, report)


def main(argv: list[str]) -> None:
    register_schema()
    raw = parse_args("prepare_data", argv)
    cfg: PrepareDataConfig = OmegaConf.to_object(raw)
    out = Path(cfg.out).expanduser().resolve()
    with config_errors():
        tokenizer = check(cfg, out)
        with staged(out) as folder:
            meta = write_shards(cfg, tokenizer, folder)
    print(f"done: {meta['num_tokens']:,} tokens ({meta['dtype']}, vocab {meta['vocab_size']}) in "
          f"{len(meta['shards'])} shards under {out}\n"
          f"train on them with: python -m recipes.pretrain data=tokens data.path={out} "
          f"(model.vocab_size must be at least {meta['vocab_size']})", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
