"""Per-file sizes and checksums of a checkpoint folder, so a truncated or altered file is caught.

CRC-32 (zlib, in the standard library) is used: it is fast enough to keep saving near raw write
speed and catches truncation and bit flips; it does not defend against deliberate tampering.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any, BinaryIO

MANIFEST = "manifest.json"
CHUNK = 8 << 20


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or altered."""

    def __init__(self, path: Path, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"checkpoint file {path} is {problem}")


class ChecksumWriter:
    """A binary file opened for writing that keeps the size and CRC-32 of what is written through it
    (for a file written once, front to back, as DCP writes its shards)."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.size, self.crc = raw, 0, 0
        self.error: OSError | None = None  # the first failed write's (torch.save hides it behind a RuntimeError)

    def write(self, data: Any) -> int:
        try:
            n = self.raw.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise
        self.crc = zlib.crc32(data, self.crc)
        self.size += memoryview(data).nbytes
        return n

    def record(self) -> dict:
        return {"size": self.size, "crc32": self.crc}

    def __getattr__(self, name: str) -> Any:  # tell, flush, fileno, close: the file's own
        return getattr(self.raw, name)


def file_record(path: Path) -> dict:
    """Size and CRC-32 of one file."""
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return {"size": path.stat().st_size, "crc32": crc}


def fsync_path(path: Path) -> None:
    """Flush a file or folder entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path, records: dict[str, dict]) -> None:
    path = folder / MANIFEST
    path.write_text(json.dumps({"files": records}, indent=1, sort_keys=True))
    fsync_path(path)


def read_manifest(folder: Path) -> dict[str, dict]:
    path = folder / MANIFEST
    if not path.is_file():
        raise CorruptCheckpointError(path, "missing")
    return json.loads(path.read_text())["files"]


def check_size(path: Path, expected: dict) -> None:
    """The file exists with its recorded size (catches missing and truncated files without reading them)."""
    if not path.is_file():
        raise CorruptCheckpointError(path, "missing")
    size = path.stat().st_size
    if size != expected["size"]:
        raise CorruptCheckpointError(path, f"truncated or padded ({size} bytes, manifest says {expected['size']})")


def verify_files(folder: Path, records: dict[str, dict], names: list[str]) -> None:
    """Check `names` (a share of the manifest) against their recorded size and checksum."""
    for name in names:
        path = folder / name
        check_size(path, records[name])
        if file_record(path)["crc32"] != records[name]["crc32"]:
            raise CorruptCheckpointError(path, "altered (checksum mismatch)")
