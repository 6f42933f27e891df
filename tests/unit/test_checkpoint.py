"""CheckpointManager in one process: checksums taken while writing, background commit and pruning,
the checksum taken while loading with the fall back to the previous commit, and in-place reads."""

from __future__ import annotations

import dataclasses
import errno
import os
import pickle
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem
from torch.distributed.checkpoint.state_dict import get_state_dict

from titan.checkpoint import CheckpointManager
from titan.checkpoint.manifest import CorruptCheckpointError, file_record, read_manifest, write_manifest
from titan.checkpoint.resume import load_newest_intact
from titan.checkpoint.space import OTHER, SPACE, STORAGE, classify
from titan.checkpoint.storage import InPlaceReader, stored_tensor
from titan.config import ConfigError, ModelConfig


def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A small model with AdamW state, its values set by `seed`."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 64)).square().mean().backward()
    optimizer.step()
    return model, optimizer


def train_state(step: int) -> dict:
    return {"step": step, "config": {"model": dataclasses.asdict(ModelConfig())}}


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def flip_a_byte(path: Path, where: float = 0.5) -> None:
    """Alter a shard, keeping its size: in the middle, tensor bytes; at its start, the first record's pickle."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * where) or 64] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("async_save", [False, True])
def test_checksums_taken_while_writing_match_the_files(tmp_path, async_save):
    manager = CheckpointManager(tmp_path, keep=2, is_writer=True, async_save=async_save)
    model, optimizer = build(0)
    manager.save(1, model, optimizer, train_state(1))
    manager.close()
    assert torch.serialization.get_crc32_options()  # off only while the shards were written
    step = manager.latest()
    assert step == tmp_path / "checkpoints" / "step-1"
    records = read_manifest(step)
    assert any(name.endswith(".distcp") for name in records)
    assert records == {p.name: file_record(p) for p in step.iterdir() if p.name not in ("manifest.json", "COMMITTED")}
    CheckpointManager.verify(step)


@pytest.mark.parametrize("async_save", [False, True])
def test_pruning_keeps_the_newest_commits_and_clears_leftovers(tmp_path, async_save):
    folder = tmp_path / "checkpoints"
    (folder / ".tmp-step-99").mkdir(parents=True)  # a save a crash left unfinished
    (folder / "step-98").mkdir()  # a deletion a crash left unfinished (no marker)
    manager = CheckpointManager(tmp_path, keep=2, is_writer=True, async_save=async_save)
    model, optimizer = build(0)
    for step in range(1, 5):
        manager.save(step, model, optimizer, train_state(step))
        manager.poll()
        assert len(manager.committed()) >= min(step - async_save, 2)  # never fewer than keep once committed
    manager.wait()
    assert sorted(p.name for p in folder.iterdir()) == ["step-3", "step-4"]
    manager.close()


@pytest.mark.parametrize("reusable", [True, False])
def test_async_saves_in_a_row_with_a_kept_or_a_fresh_stager(tmp_path, monkeypatch, reusable):
    """torch >= 2.13 leaves a stager passed to async_save to the caller, older torch closes it after
    one save: the manager keeps one where it may and takes a fresh one per save otherwise."""
    monkeypatch.setattr("titan.checkpoint.manager.STAGER_REUSABLE", reusable)
    manager = CheckpointManager(tmp_path, keep=2, is_writer=True, async_save=True)
    assert (manager.stager is not None) == reusable
    model, optimizer = build(0)
    for step in (1, 2, 3):
        manager.save(step, model, optimizer, train_state(step))
    manager.close()
    target, target_optim = build(1)
    assert CheckpointManager.load(manager.latest(), target, target_optim)["step"] == 3 and same(model, target)


@pytest.mark.parametrize("algorithm", ["xxh3_64", "crc32"])  # new manifests; those written before 2026-12-03
@pytest.mark.parametrize("where", [0.5, 0.0])  # tensor bytes load silently; a broken pickle fails DCP's load
def test_load_checksums_the_shards_and_names_a_corrupt_one(tmp_path, where, algorithm):
    manager = CheckpointManager(tmp_path, keep=2, is_writer=True)
    model, optimizer = build(0)
    manager.save(1, model, optimizer, train_state(1))
    manager.close()
    step = manager.latest()
    records = read_manifest(step)
    assert all(set(record) == {"size", "xxh3_64"} for record in records.values())
    if algorithm == "crc32":  # the manifest an older version wrote: still checked, with zlib
        write_manifest(step, {name: {"size": r["size"], "crc32": zlib.crc32((step / name).read_bytes())}
                              for name, r in records.items()})
    CheckpointManager.verify(step)
    target, target_optim = build(1)
    assert CheckpointManager.load(step, target, target_optim)["step"] == 1 and same(model, target)
    shard = next(step.glob("*.distcp"))
    flip_a_byte(shard, where)
    CheckpointManager.check_intact(step)  # the size is right: only the checksum can tell
    with pytest.raises(CorruptCheckpointError, match=rf"{shard.name} is altered \({algorithm} checksum mismatch\)"):
        CheckpointManager.verify(step)
    with pytest.raises(CorruptCheckpointError, match=shard.name):
        CheckpointManager.load(step, target, target_optim)
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        CheckpointManager.check_intact(step)


def test_corrupt_newest_commit_fails_or_falls_back_to_the_previous(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2, is_writer=True)
    old, old_optim = build(0)
    manager.save(1, old, old_optim, train_state(1))
    new, new_optim = build(1)
    manager.save(2, new, new_optim, train_state(2))
    manager.close()
    flip_a_byte(next(manager.latest().glob("*.distcp")))
    candidates = manager.committed()[::-1]
    target, target_optim = build(2)
    with pytest.raises(ConfigError, match="on_corrupt=previous"):
        load_newest_intact(candidates, "fail", train_state(0)["config"], target, target_optim, print)
    warnings: list[str] = []
    path, saved = load_newest_intact(candidates, "previous", train_state(0)["config"], target, target_optim, warnings.append)
    assert path == candidates[1] and saved["step"] == 1 and same(old, target)
    assert torch.equal(target_optim.state_dict()["state"][0]["exp_avg"], old_optim.state_dict()["state"][0]["exp_avg"])
    assert len(warnings) == 1 and "altered" in warnings[0]


@pytest.mark.parametrize("make", [
    lambda: torch.randn(5, 7),
    lambda: torch.randn(6, 7)[2:],  # a view: the whole storage is saved, with an offset
    lambda: torch.tensor(3.5),
    lambda: torch.randn(4, 3).to(torch.bfloat16),
    lambda: torch.zeros(0, 3),
])
def test_stored_tensor_finds_the_bytes_of_a_saved_tensor(tmp_path, make):
    tensor = make()
    path = tmp_path / "f"
    with path.open("wb") as f:
        f.write(b"x" * 100)  # records sit at an offset in a shard file
        torch.save(tensor, f)
    fd = os.open(path, os.O_RDONLY)
    try:
        stored = stored_tensor(fd, 100, path.stat().st_size - 100)
        assert stored is not None and stored.is_contiguous()
        assert (stored.dtype, stored.size) == (tensor.dtype, tuple(tensor.shape))
        out = torch.empty_like(tensor)
        os.preadv(fd, [memoryview(out.reshape(-1).view(torch.uint8).numpy())], stored.data_offset)
        assert torch.equal(out, tensor)
        assert stored_tensor(fd, 0, 100) is None  # not a record
    finally:
        os.close(fd)


def test_stored_tensor_reports_a_transposed_layout(tmp_path):
    path = tmp_path / "f"
    torch.save(torch.randn(3, 5).t(), path)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert not stored_tensor(fd, 0, path.stat().st_size).is_contiguous()
    finally:
        os.close(fd)


def test_same_layout_load_reads_every_tensor_in_place(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2, is_writer=True)
    model, optimizer = build(0)
    manager.save(1, model, optimizer, train_state(1))
    manager.close()
    target, target_optim = build(1)
    model_sd, optim_sd = get_state_dict(target, target_optim)
    reader = InPlaceReader(manager.latest())
    dcp.load({"model": model_sd, "optim": optim_sd}, storage_reader=reader)
    tensors = [*model.state_dict().values(), *(v for s in optimizer.state.values() for v in s.values())]
    assert reader.in_place_bytes == sum(t.numel() * t.element_size() for t in tensors)
    assert same(model, target)
    stock, stock_optim = build(2)  # DCP's own reader (torch.load) reads the records saved without torch's CRC
    model_sd, optim_sd = get_state_dict(stock, stock_optim)
    dcp.load({"model": model_sd, "optim": optim_sd}, storage_reader=FileSystemReader(manager.latest()))
    assert same(model, stock)


class SlicePlanner:
    """The two calls a LoadPlanner gets from a reader: where an item goes, and that it arrived."""

    def __init__(self, dest: torch.Tensor):
        self.dest, self.committed = dest, 0

    def resolve_tensor(self, item: ReadItem) -> torch.Tensor:
        return self.dest

    def commit_tensor(self, item: ReadItem, tensor: torch.Tensor) -> None:
        self.committed += 1


@pytest.mark.parametrize("offsets,lengths,dtype", [
    ((0, 0), (6, 4), torch.float32),  # the whole stored tensor: in place
    ((2, 0), (3, 4), torch.float32),  # a block of rows: in place
    ((2, 1), (3, 2), torch.float32),  # a block of columns (a reshaped load): through the buffer
    ((0, 0), (6, 4), torch.bfloat16),  # another dtype: through the buffer, converted
])
def test_in_place_reader_reads_slices_of_stored_tensors(tmp_path, offsets, lengths, dtype):
    stored = torch.randn(6, 4)
    path = tmp_path / "__0_0.distcp"
    with path.open("wb") as f:
        f.write(b"x" * 100)
        torch.save(stored, f)
    reader = InPlaceReader(tmp_path)
    index = MetadataIndex("w", (0, 0))
    reader.storage_data = {index: _StorageInfo(path.name, 100, path.stat().st_size - 100)}
    item = ReadItem(LoadItemType.TENSOR, index, torch.Size([0, 0]), index, torch.Size(offsets), torch.Size(lengths))
    planner = SlicePlanner(torch.zeros(lengths, dtype=dtype))
    reader.read_data(LoadPlan([item]), planner).wait()
    expected = stored[offsets[0]:offsets[0] + lengths[0], offsets[1]:offsets[1] + lengths[1]].to(dtype)
    assert planner.committed == 1 and torch.equal(planner.dest, expected)
    in_place = dtype == torch.float32 and lengths[1] == 4
    assert reader.in_place_bytes == (expected.numel() * 4 if in_place else 0)


class _FillingFile:
    """A binary file on a disk that is full after 1000 bytes."""

    def __init__(self) -> None:
        self.room = 1000

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= size
        return size

    def flush(self) -> None:
        pass


def _torch_short_write() -> BaseException:
    """What torch (2.13) raises when a file's writes fail midway: the OS error only as its context."""
    with pytest.raises(RuntimeError) as caught:
        torch.save(torch.zeros(1000), _FillingFile())
    assert "unexpected pos" in str(caught.value) and isinstance(caught.value.__context__, OSError)
    return caught.value


def _pickled(exc: BaseException) -> BaseException:
    """`exc` as it reaches another rank: without its chain."""
    return pickle.loads(pickle.dumps(exc))


def _raised(exc: BaseException, cause: BaseException | None = None, context: BaseException | None = None):
    exc.__cause__, exc.__context__ = cause, context
    return exc


def _in_dcp(exc: BaseException) -> CheckpointException:
    try:
        raise exc
    except BaseException as raised:  # DCP wraps each rank's failure with its traceback
        return CheckpointException("write", {1: _wrap_exception(raised)})


@pytest.mark.parametrize("make, kind, detail", [
    (lambda: _raised(RuntimeError("save failed"), cause=OSError(errno.ENOSPC, "No space left on device", "f")),
     SPACE, "No space left on device: 'f'"),
    (lambda: _raised(RuntimeError("save failed"), context=OSError(errno.EDQUOT, "Disk quota exceeded")),
     SPACE, "Disk quota exceeded"),
    (_torch_short_write, SPACE, "[Errno 28]"),
    (lambda: _pickled(_torch_short_write()), SPACE, "a write stopped short ([enforce"),
    (lambda: _in_dcp(_pickled(_torch_short_write())), SPACE, "unexpected pos"),
    (lambda: _in_dcp(OSError(errno.ENOSPC, "No space left on device")), SPACE, "[Errno 28]"),
    (lambda: _in_dcp(OSError(errno.EIO, "Input/output error", "__1_0.distcp")), STORAGE, "Input/output error"),
    (lambda: OSError(errno.EROFS, "Read-only file system", "train_state.json"), STORAGE, "Read-only file system"),
    (lambda: _in_dcp(ValueError("bad plan")), OTHER, "ValueError: bad plan"),
], ids=["errno-cause", "edquot-context", "torch-short-write", "torch-pickled", "torch-in-dcp", "errno-in-dcp",
        "eio-in-dcp", "erofs", "other"])
def test_write_failures_are_classified_through_the_exception_chain(make, kind, detail):
    failure = classify(make(), rank=3)
    assert failure.kind == kind and detail in failure.detail and failure.rank == 3
    assert "Traceback" not in failure.detail and "\n" not in failure.detail
