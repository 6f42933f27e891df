"""Documents from the file formats large corpora come in: JSON Lines (plain, gzip or zstd), Parquet
(a text column) and a Hugging Face `datasets` folder saved with `save_to_disk` (Arrow files).

Each reader yields the text of one file's documents in file order; a file that cannot be read, a
missing column or a column that is not text is a :class:`ConfigError` naming the file and the fix.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import IO, Iterator

from titan.config import ConfigError

ARROW_STATE = "state.json"  # what `datasets.Dataset.save_to_disk` writes beside its Arrow files


def open_text(path: Path) -> IO[str]:
    """A text stream of a file, decompressed by its suffix (.gz, .zst)."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="surrogateescape")
    if path.name.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(path.open("rb"), closefd=True)
        return io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape")
    return path.open(encoding="utf-8", errors="surrogateescape")


def parquet_documents(path: Path, column: str) -> Iterator[str]:
    """The strings of `column` of a Parquet file, row by row."""
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several kinds for a damaged or foreign file
        raise ConfigError("data.path", f"{path} is not a readable Parquet file ({exc}).",
                          "point data.path at Parquet files (or pick the data= source of their format).") from None
    check_text_column(path, table.schema_arrow, column)
    for batch in table.iter_batches(columns=[column], batch_size=1024):
        yield from _strings(batch.column(0))


def arrow_folder_files(folder: Path) -> list[Path]:
    """The Arrow files of a saved `datasets` folder, in the dataset's order."""
    state = folder / ARROW_STATE
    if state.is_file():
        try:
            names = [f["filename"] for f in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
            return [folder / name for name in names]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return sorted(folder.rglob("*.arrow"))


def arrow_documents(path: Path, column: str) -> Iterator[str]:
    """The strings of `column` of one Arrow file of a saved `datasets` folder (IPC stream or file
    format), memory-mapped."""
    import pyarrow as pa

    try:
        try:
            table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    except Exception as exc:
        raise ConfigError("data.path", f"{path} is not a readable Arrow file ({exc}).",
                          "point data.path at a folder saved by datasets' save_to_disk.") from None
    check_text_column(path, table.schema, column)
    for chunk in table.column(column).chunks:
        yield from _strings(chunk)


def check_text_column(path: Path, schema, column: str) -> None:
    """Refuse a table without a text column `column`."""
    import pyarrow as pa

    if column not in schema.names:
        raise ConfigError("data.text_field", f"{path} has no column {column!r}; its columns: "
                          f"{', '.join(schema.names[:20]) or 'none'}.",
                          "set data.text_field=<the column that holds the text>.")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ConfigError("data.text_field", f"{path}: column {column!r} is {kind}, not text.",
                          "set data.text_field to the column that holds the documents' text.")


def _strings(chunk) -> Iterator[str]:
    return (text for text in chunk.to_pylist() if text is not None)
