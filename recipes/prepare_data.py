"""Tokenize a corpus once into token shards: `python -m recipes.prepare_data data=jsonl data.path=... out=<dir>`.

Documents stream from the source through the tokenizer into ``tokens-NNNNN.bin`` files of
``shard_tokens`` tokens and a ``meta.json`` (see :func:`titan.data.corpus.write_token_shards`); the
corpus is never held in memory. Everything is written into a temporary folder beside ``out`` and
renamed into place at the end, so a crash never leaves a half-written ``out``. Train on the result
with ``python -m recipes.pretrain data=tokens data.path=<out>``.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from recipes.cli import config_errors, parse_args
from titan.config import ConfigError, DataConfig
from titan.data.corpus import expand_paths, iter_documents, tokenize_documents, write_token_shards
from titan.data.tokenizer import Tokenizer, load_tokenizer

SUFFIXES = {"text": (".txt", ".md"), "jsonl": (".jsonl", ".json")}


@dataclass
class PrepareDataConfig:
    data: DataConfig = field(default_factory=DataConfig)
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
    if d.source in SUFFIXES and not d.path:
        raise ConfigError("data.path", f"data={d.name} needs a corpus path; none given.",
                          "set data.path=<file|folder|glob>.")
    if d.source in SUFFIXES and not expand_paths(d.path, SUFFIXES[d.source]):
        raise ConfigError("data.path", f"{d.path!r} matches no {' or '.join(SUFFIXES[d.source])} files.",
                          "point data.path at a file, a folder or a glob of your corpus.")
    if out.exists() and not out.is_dir():
        raise ConfigError("out", f"{out} is a file.", "pick a folder path for out.")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError("out", f"{out} already exists and is not empty.",
                          "pick a new out folder, or pass overwrite=true to replace it.")
    try:
        return load_tokenizer(d.tokenizer, d.eot_token)
    except KeyError as exc:
        raise ConfigError("data.eot_token", f"{exc.args[0]}.",
                          "set data.eot_token=<the tokenizer's end-of-text token>.")
    except (OSError, ValueError) as exc:
        raise ConfigError("data.tokenizer", f"cannot load {d.tokenizer!r}: {exc}.",
                          "use `byte` or the path of a Hugging Face tokenizer.json.")


def write_shards(cfg: PrepareDataConfig, tokenizer: Tokenizer, folder: Path) -> dict:
    """Stream the corpus through the tokenizer into `folder`; returns the metadata."""
    d = cfg.data
    spec = d.tokenizer if d.tokenizer == "byte" else str(Path(d.tokenizer).resolve())
    docs = iter_documents(d.source, d.path, d.text_field)

    def report(shard: dict) -> None:
        print(f"{shard['file']}: {shard['tokens']:,} tokens", flush=True)

    try:
        meta = write_token_shards(tokenize_documents(docs, tokenizer), folder, cfg.shard_tokens, tokenizer, spec,
                                  report)
    except json.JSONDecodeError as exc:
        raise ConfigError("data.path", f"a line is not JSON ({exc}).", "give one JSON object per line.")
    except KeyError as exc:
        raise ConfigError("data.text_field", f"a document has no field {exc}.",
                          "set data.text_field to the field that holds the text.")
    if meta["num_tokens"] == 0:
        raise ConfigError("data.path", f"{d.path!r} holds no documents.", "point data.path at a non-empty corpus.")
    return meta


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A new folder that replaces `out` if the block succeeds; a failure leaves `out` as it was.

    The folder lives in a hidden staging folder beside `out` (same file system, so the final move is
    a rename); a replaced `out` is moved into it and deleted with it.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        folder = staging / "new"
        folder.mkdir()  # mkdtemp's folders are private; this one gets the usual permissions
        yield folder
        if out.exists():
            out.rename(staging / "old")
        folder.rename(out)
    finally:
        shutil.rmtree(staging)


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
