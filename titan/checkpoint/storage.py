"""DCP's file storage, with two changes that keep checkpoint I/O near raw file speed.

- `ShardWriter`: DCP's FileSystemWriter, checksumming each shard file as it writes it, so that the
  commit does not read the files back for the manifest (and without torch.save's own CRC-32 of
  each record, which the manifest makes redundant). A failed write raises its OS error (errno and
  file), where torch.save would say only ``unexpected pos``.
- `InPlaceReader`: DCP's FileSystemReader, reading the tensors itself: a whole stored tensor (or a
  block of its rows: a load into the layout that wrote it) straight into the destination tensor,
  any other slice or dtype through one buffer reused from tensor to tensor, where DCP would
  `torch.load` each record into new memory and copy it over. Records it does not recognise go
  through DCP's own path.

A shard file is a series of `torch.save` records (each a ZIP archive, entries stored uncompressed)
at the offsets DCP's metadata gives. A record's pickle names one storage and the view into it
(`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`); the storage's bytes are
the ZIP entry `data/<key>`.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem, SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from titan.checkpoint.manifest import ChecksumWriter

SHARD_SUFFIX = ".distcp"
# signature, version, flags, method, (time, date, CRC-32), compressed and full size, name and extra lengths
ZIP_LOCAL_HEADER = struct.Struct("<4sHHH8xIIHH")
RECORD_HEAD = 16 << 10  # bytes read from a record's start to find its tensor: pickle and headers fit
STORAGE_DTYPES = {"FloatStorage": torch.float32, "BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16,
                  "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                  "BoolStorage": torch.bool}


class _ChecksummingFileSystem(FileSystem):
    """DCP's local file system, recording the size and checksum of each shard file as it is written."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, dict] = {}

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        with super().create_stream(path, mode) as stream:
            if mode != "wb" or not str(path).endswith(SHARD_SUFFIX):
                yield stream
                return
            writer = ChecksumWriter(stream)
            try:
                yield writer
            except (RuntimeError, OSError) as exc:  # torch.save says "unexpected pos": raise the OS error behind it
                error = writer.error or (exc if isinstance(exc, OSError) else None)
                if error is None:
                    raise
                raise OSError(error.errno, error.strerror, str(path)) from exc  # naming the file
        self.records[Path(path).name] = writer.record()


class ShardWriter(FileSystemWriter):
    """DCP's FileSystemWriter (one file per rank, fsynced) that checksums each shard file as it writes it
    (`records`), and skips torch.save's own CRC-32 of each record: the manifest covers every byte."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.fs = _ChecksummingFileSystem()

    @property
    def records(self) -> dict[str, dict]:
        return self.fs.records

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        # torch's serialization settings are per thread, and with one writer thread (the default)
        # every file is written on this one, also when it is async_save's background thread.
        before = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            return super().write_data(plan, planner)
        finally:
            torch.serialization.set_crc32_options(before)


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """Where a `torch.save`d tensor's bytes sit in a file, and how they are laid out."""
    data_offset: int  # of the tensor's first element, in the file
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def is_contiguous(self) -> bool:
        return self.stride == _contiguous_stride(self.size)


def _contiguous_stride(size: tuple[int, ...]) -> tuple[int, ...]:
    stride, step = [], 1
    for n in reversed(size):
        stride.append(step)
        step *= max(n, 1)
    return tuple(reversed(stride))


class _TensorPickle(pickle.Unpickler):
    """Reads the pickle of a `torch.save`d plain tensor without building it: its storage and view."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *rest: (storage, offset, tuple(size), tuple(stride))
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in STORAGE_DTYPES:
            return name
        raise pickle.UnpicklingError(f"not a plain tensor record: {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        return pid  # ("storage", storage type name, key, location, numel)


def _zip_entries(head: bytes) -> Iterator[tuple[str, int, int | None]]:
    """(name, offset of its bytes, size) of each entry of a ZIP archive whose local header lies in
    `head`, the archive's first bytes, in order; the size is None (and the walk ends) for an entry
    whose size `head` cannot tell. Raises BadZipFile for an entry that is not stored as is."""
    pos = 0
    while pos + ZIP_LOCAL_HEADER.size <= len(head):
        signature, _, flags, method, _, size, name_len, extra_len = ZIP_LOCAL_HEADER.unpack_from(head, pos)
        if signature != b"PK\x03\x04":
            return  # the central directory: no more entries
        if method != zipfile.ZIP_STORED:
            raise zipfile.BadZipFile("a compressed entry")
        name_at = pos + ZIP_LOCAL_HEADER.size
        start = name_at + name_len + extra_len
        name = head[name_at:name_at + name_len].decode()
        if flags & 0x08:  # the size follows the bytes, in a data descriptor (as torch.save writes)
            found = _data_descriptor(head, start)
            if found is None:
                yield name, start, None
                return
            size, descriptor = found
        else:
            size, descriptor = size, 0
        yield name, start, size
        pos = start + size + descriptor


def _data_descriptor(head: bytes, start: int) -> tuple[int, int] | None:
    """(size, descriptor length) of the entry whose bytes begin at `start`: the first data descriptor
    after them whose sizes equal its distance from `start` (32- or 64-bit sizes), if `head` holds it."""
    at = head.find(b"PK\x07\x08", start)
    while at >= 0:
        if len(head) >= at + 16 and struct.unpack_from("<II", head, at + 8) == (at - start, at - start):
            return at - start, 16
        if len(head) >= at + 24 and struct.unpack_from("<QQ", head, at + 8) == (at - start, at - start):
            return at - start, 24
        at = head.find(b"PK\x07\x08", at + 1)
    return None


def stored_tensor(fd: int, start: int, length: int) -> StoredTensor | None:
    """The tensor `torch.save`d at [start, start + length) of a file, or None when the record is not a
    plain, little-endian, uncompressed tensor record. Reads only the record's first bytes (its
    pickle and the local headers before the tensor's bytes), so a load reads each record front to back."""
    head = os.pread(fd, min(length, RECORD_HEAD), start)
    try:
        entries = {name: (at, size) for name, at, size in _zip_entries(head)}
        pkl = next(n for n in entries if n.endswith("/data.pkl"))
        prefix = pkl[:-len("data.pkl")]
        (kind, storage_type, key, _, numel), offset, size, stride = _TensorPickle(io.BytesIO(_entry(head, entries[pkl]))).load()
        order = entries.get(f"{prefix}byteorder")
        little = order is None or _entry(head, order) == b"little"
        data, data_size = entries[f"{prefix}data/{key}"]
    except (zipfile.BadZipFile, KeyError, StopIteration, ValueError, TypeError, pickle.UnpicklingError, struct.error):
        return None
    dtype = STORAGE_DTYPES[storage_type]
    nbytes = numel * dtype.itemsize
    if kind != "storage" or not little or data_size not in (None, nbytes) or data + nbytes > length \
            or offset + math.prod(size) > numel:
        return None
    return StoredTensor(start + data + offset * dtype.itemsize, dtype, size, stride)


def _entry(head: bytes, entry: tuple[int, int | None]) -> bytes:
    """A small entry's bytes, which `head` must hold whole."""
    start, size = entry
    if size is None:
        raise zipfile.BadZipFile("an entry lies beyond the bytes read")
    return head[start:start + size]


def _narrow(tensor: torch.Tensor, offsets: tuple[int, ...], lengths: tuple[int, ...]) -> torch.Tensor:
    for dim, (offset, length) in enumerate(zip(offsets, lengths)):
        tensor = tensor.narrow(dim, offset, length)
    return tensor


def _pread_into(fd: int, tensor: torch.Tensor, position: int) -> None:
    """Fill a contiguous CPU tensor with the file's bytes from `position`."""
    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], position + done)
        if n == 0:
            raise EOFError(f"file ends inside a stored tensor, at byte {position + done}")
        done += n


class InPlaceReader(FileSystemReader):
    """FileSystemReader that reads stored tensors itself: a whole stored tensor (or a block of its rows)
    straight into its destination when the destination is contiguous and of the same dtype, any other
    slice through a buffer reused from item to item; `torch.load` only for records it does not
    recognise. `in_place_bytes` counts the bytes read straight into destinations."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.in_place_bytes = 0
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        rest: list[ReadItem] = []
        for relative_path, items in per_file.items():
            items.sort(key=lambda item: self.storage_data[item.storage_index].offset)  # front to back
            fd = os.open(Path(self.path) / relative_path, os.O_RDONLY)
            try:
                rest += [item for item in items if not self._read_tensor(fd, item, planner)]
            finally:
                os.close(fd)
        self.buffer = torch.empty(0, dtype=torch.uint8)
        return super().read_data(dataclasses.replace(plan, items=rest), planner)

    def _read_tensor(self, fd: int, item: ReadItem, planner: LoadPlanner) -> bool:
        """Read a tensor item into its destination; False (nothing done) for one to leave to DCP."""
        info = self.storage_data[item.storage_index]
        if item.type != LoadItemType.TENSOR or info.transform_descriptors:
            return False
        stored = stored_tensor(fd, info.offset, info.length)
        if stored is None or not stored.is_contiguous():
            return False
        offsets, lengths = tuple(item.storage_offsets), tuple(item.lengths)
        target = planner.resolve_tensor(item).detach()
        if target.device.type != "cpu" or tuple(target.shape) != lengths or len(lengths) != len(stored.size):
            return False
        # The rows (dim 0) the item needs are one byte range; the item is that range as is when it
        # spans the other dims whole.
        first, rows = (offsets[0], lengths[0]) if lengths else (0, 1)
        row_bytes = math.prod(stored.size[1:]) * stored.dtype.itemsize
        position = stored.data_offset + first * row_bytes
        if lengths[1:] == stored.size[1:] and target.dtype == stored.dtype and target.is_contiguous():
            _pread_into(fd, target, position)
            self.in_place_bytes += target.numel() * target.element_size()
        elif target.numel():
            block = self._block((rows, *stored.size[1:]) if lengths else (), stored.dtype)
            _pread_into(fd, block, position)
            target.copy_(_narrow(block, (0, *offsets[1:]) if lengths else (), lengths))
        planner.commit_tensor(item, target)
        return True

    def _block(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor of `shape` over the reused buffer."""
        nbytes = math.prod(shape) * dtype.itemsize
        if self.buffer.numel() < nbytes:
            self.buffer = torch.empty(nbytes, dtype=torch.uint8)
        return self.buffer[:nbytes].view(dtype).view(shape)
