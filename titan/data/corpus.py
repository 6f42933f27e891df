"""Document sources and the token stream they become.

Sources: ``pydoc`` (the Python documentation bundled with the standard library, real English text
that needs no network), local ``text`` files (one document per file), ``jsonl`` files (one document
per line; ``.gz`` and ``.zst`` compressed too), ``parquet`` files (a text column), ``hf``: a folder
saved by ``datasets``' ``save_to_disk`` (`titan.data.readers`), and ``tokens``: shards written by
``python -m recipes.prepare_data``, memory-mapped.

Bad input is refused here, where the file and line are known, with a :class:`ConfigError` both
recipes report alike: a path matching no files, a line that is not JSON or lacks the text field, a
file of undecodable bytes, a corpus without text, a token shard whose size or checksum differs from
``meta.json``.
"""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from parallel.mesh import report_once
from titan.checkpoint.manifest import file_checksum, recorded_checksum
from titan.config import ConfigError
from titan.data.encoding import chunked, encode_chunk
from titan.data.readers import arrow_documents, arrow_folder_files, open_text, parquet_documents
from titan.data.tokenizer import Tokenizer

SHARD_META = "meta.json"
SHARD_FILE = "tokens-{:05d}.bin"
SUFFIXES = {"text": (".txt", ".md"), "jsonl": (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst"),
            "parquet": (".parquet",), "hf": (".arrow",)}
KINDS = {"text": ".txt or .md", "jsonl": ".jsonl or .json (plain, .gz or .zst)", "parquet": ".parquet", "hf": ".arrow"}
UNDECODABLE_LIMIT = 0.05  # a text file with a larger share of undecodable characters is refused as binary
UNDECODABLE = re.compile("[\ufffd\x00]")  # what undecodable bytes (and binary zeros) read as in a .txt
ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # a non-UTF-8 byte read with errors="surrogateescape"
JSON_KINDS = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "a boolean", type(None): "null"}


def expand_paths(path: str, suffixes: tuple[str, ...]) -> list[Path]:
    """A file, a folder (searched recursively for `suffixes`) or a glob, sorted."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(suffixes))
    return sorted(Path(f) for f in glob.glob(path, recursive=True) if Path(f).is_file())


def corpus_files(source: str, path: str) -> list[Path]:
    """The files of a text, jsonl, parquet or hf (a saved `datasets` folder) corpus; refuses a path that
    matches none."""
    files = arrow_folder_files(Path(path)) if source == "hf" and Path(path).is_dir() else expand_paths(path, SUFFIXES[source])
    if files:
        return files
    wanted = KINDS[source]
    if Path(path).is_dir():
        problem = f"the folder {path} holds no {wanted} files (searched recursively)."
    elif any(c in path for c in "*?["):
        problem = f"the glob {path!r} matches no files."
    else:
        problem = f"{path} does not exist."
    raise ConfigError("data.path", problem, f"point data.path at a {wanted} file, a folder holding such files, "
                      f"or a glob of them (data={source} reads {wanted} files).")


def iter_documents(source: str, path: str | None, text_field: str = "text") -> Iterator[str]:
    """Yield documents of a text source in a fixed order; refuses a corpus without any text."""
    if source == "pydoc":
        from pydoc_data.topics import topics

        for key in sorted(topics):
            yield topics[key]
        return
    if source not in SUFFIXES:
        raise ValueError(f"not a text source: {source}")
    files = corpus_files(source, path)
    has_text = False
    read = {"text": lambda f: (_text_file(f),), "jsonl": lambda f: _jsonl_documents(f, text_field),
            "parquet": lambda f: parquet_documents(f, text_field), "hf": lambda f: arrow_documents(f, text_field)}[source]
    for f in files:
        for doc in read(f):
            has_text = has_text or (bool(doc) and not doc.isspace())
            yield doc
    if not has_text:
        what = "all empty or blank" if source == "text" else f"no document with a non-blank {text_field!r} field"
        wanted = KINDS[source]
        raise ConfigError("data.path", f"{path} holds no text ({len(files)} {wanted} file(s) searched, {what}).",
                          f"point data.path at the {wanted} files that hold your corpus.")


def _text_file(f: Path) -> str:
    """One text document; a file that is mostly undecodable bytes (binary) is refused, a few are warned of."""
    text = f.read_text(encoding="utf-8", errors="replace")
    bad = text.count("\ufffd") + text.count("\x00")
    if not bad:
        return text
    line = text.count("\n", 0, UNDECODABLE.search(text).start()) + 1
    share = bad / len(text)
    if share > UNDECODABLE_LIMIT:
        raise ConfigError("data.path", f"{f} is not UTF-8 text: {share:.0%} of it is undecodable bytes or NULs, the "
                          f"first on line {line} (a compressed or binary file, or another encoding).",
                          f"decompress or convert {f.name} to UTF-8 text, or remove it from data.path.")
    report_once(f"warning: {f}: {bad} undecodable byte(s) or NUL(s), the first on line {line}, read as U+FFFD; "
                "using the file anyway.")
    return text


def _jsonl_documents(f: Path, text_field: str) -> Iterator[str]:
    """The `text_field` of each non-blank line of a JSON Lines file."""
    with open_text(f) as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                yield _json_document(f"{f}:{number}", line, text_field)


def _json_document(where: str, line: str, text_field: str) -> str:
    """The document of one JSON line; `where` (file:line) names it in errors."""
    escaped = ESCAPED_BYTE.search(line)
    if escaped:
        raise ConfigError("data.path", f"{where} is not UTF-8 (byte 0x{ord(escaped.group()) - 0xDC00:02x} at "
                          f"column {escaped.start() + 1}): the file is binary, compressed or in another encoding.",
                          "convert the file to UTF-8 JSON Lines (decompress it, or re-encode it, e.g. with iconv), "
                          "or remove it from data.path.")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError("data.path", f"{where} is not valid JSON ({exc.msg} at column {exc.colno}).",
                          _one_object_per_line(text_field)) from None
    if not isinstance(record, dict):
        raise ConfigError("data.path", f"{where} is {_json_kind(record)}, not a JSON object.",
                          _one_object_per_line(text_field))
    if text_field not in record:
        fields = ", ".join(list(record)[:20]) or "none"
        raise ConfigError("data.text_field", f"{where} has no field {text_field!r}; its fields: {fields}.",
                          f"set data.text_field=<one of them> (the field that holds the text), or give every "
                          f"line a {text_field!r} field.")
    text = record[text_field]
    if not isinstance(text, str):
        raise ConfigError("data.text_field", f"{where}: field {text_field!r} is {_json_kind(text)}, not a string.",
                          f"make {text_field!r} a string on every line, or set data.text_field to the field that "
                          "holds the text.")
    return text


def _one_object_per_line(text_field: str) -> str:
    return f'give one JSON object per line, e.g. {{"{text_field}": "..."}} (JSON Lines, UTF-8).'


def _json_kind(value: Any) -> str:
    return JSON_KINDS.get(type(value), type(value).__name__)


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


def read_shard_meta(folder: str, key: str = "data.path") -> dict:
    """The meta.json of a prepare_data out folder; refuses a folder without a readable one (naming `key`)."""
    path = Path(folder) / SHARD_META
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problem = f"{folder} holds no {SHARD_META} from recipes.prepare_data."
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problem = f"{path} cannot be read ({exc})."
    raise ConfigError(key, problem, f"run `python -m recipes.prepare_data ... out=<dir>` and point {key} at its "
                      "out folder.")


def load_token_shards(folder: str, verify_checksums: bool = False) -> tuple[TokenStream, dict]:
    """Memory-map the shards a prepare_data run wrote, after checking every shard's size (and, with
    `verify_checksums`, its checksum: reads every shard) against meta.json; returns the stream and metadata."""
    meta = read_shard_meta(folder)
    itemsize = np.dtype(meta["dtype"]).itemsize
    for shard in meta["shards"]:
        check_shard(Path(folder) / shard["file"], shard, itemsize, verify_checksums)
    arrays = [np.memmap(Path(folder) / s["file"], dtype=meta["dtype"], mode="r") for s in meta["shards"]]
    return TokenStream(arrays), meta


def check_shard(path: Path, shard: dict, itemsize: int, verify_checksum: bool) -> None:
    """Refuse a shard that is missing, of another size than meta.json records (older meta.json files
    record no size: tokens x itemsize) or, when asked, of another checksum (XXH3-64; older ones CRC-32)."""
    if verify_checksum and recorded_checksum(shard) is None:
        raise ConfigError("data.verify_checksums", f"{path.parent / SHARD_META} records no checksums (an older "
                          "recipes.prepare_data wrote it).", f"{_prepare_again(path.parent)}, or set data.verify_checksums=false.")
    problem = _shard_problem(path, shard, itemsize, verify_checksum)
    if problem:
        raise ConfigError("data.path", f"token shard {path} {problem}.",
                          f"{_prepare_again(path.parent)}, or restore the shard from a good copy.")


def _shard_problem(path: Path, shard: dict, itemsize: int, verify_checksum: bool) -> str | None:
    recorded = shard.get("size", shard["tokens"] * itemsize)
    if not path.is_file():
        return f"is missing ({SHARD_META} records {recorded} bytes)"
    size = path.stat().st_size
    if size != recorded:
        return f"is truncated or padded: {size} bytes found, {SHARD_META} records {recorded}"
    if not verify_checksum:
        return None
    algorithm, expected = recorded_checksum(shard)
    found = file_checksum(path, algorithm)
    if found != expected:
        return f"is altered: {algorithm} checksum {found:x} found, {SHARD_META} records {expected:x} (the size matches)"
    return None


def _prepare_again(folder: Path) -> str:
    return f"re-run `python -m recipes.prepare_data` on the corpus with out={folder} overwrite=true"


def build_stream(source: str, path: str | None, tokenizer: Tokenizer, text_field: str = "text") -> TokenStream:
    """The whole corpus as one token stream (text sources are tokenized in memory)."""
    if source == "tokens":
        return load_token_shards(path)[0]
    docs = iter_documents(source, path, text_field)
    return TokenStream([np.concatenate([encode_chunk(chunk, tokenizer).tokens for chunk in chunked(docs, 256)])])
