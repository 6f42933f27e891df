"""One torchrun job of `benchmarks.checkpoint`: every measurement of the checkpoint benchmark, in one run.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m benchmarks.checkpoint_worker \
        --out DIR --work DIR [--rounds 7] [--saves 3] [--reshape tp2,ddp2] [--keep 2] \
        [--save-variants ...] [--phases save,load,reshape,stall] [recipe overrides ...]

The model, optimizer, schedule, loader and `Trainer` are built exactly as `recipes/pretrain.py`
builds them (`build_layout` -> `build_parallel_model` -> `build_optimizer`), and one training step
runs so that AdamW's moments exist. Everything is saved and loaded through the framework's own
`titan.checkpoint.CheckpointManager`. Rank 0 writes `<out>/results.json`.

Phases (each timed span starts and ends with a barrier, so it is the slowest rank's time):

1. save: `CheckpointManager.save` (get_state_dict, DCP planning + write with a checksum of each file
   as it is written + fsync of each file, then the commit: manifest, fsyncs, marker, rename; the
   pruning follows on a background thread, which the harness lets finish, untimed, before the next
   side) against a raw write by every rank of its own bytes (its local tensors, padded to the exact
   size of its `.distcp` file) into a new file with one fsync, as DCP's FileSystemWriter does, then
   deleting the files older than the last `keep` (timed apart too). The order rotates every round;
   each side starts after a sync and a page-cache drop.
2. load: `load_newest_intact` (what a resume runs: sizes checked, then `CheckpointManager.load`,
   which checksums the shards on a thread while DCP reads them) against a raw read by every rank
   of its own `.distcp` file into a preallocated buffer (and, for reference, into new memory, and
   the load without its checksum). The page cache is dropped before each
   (``/proc/sys/vm/drop_caches``, root only; otherwise all are warm, and the result says so).
3. reshape: the checkpoint written by this layout loaded (cold cache) into the same layout and
   into other layouts built in the same processes (``tp2``: tensor parallel 2; ``ddp2``:
   replicated, each rank reads everything), order rotating; then every layout's full weights are
   compared with the same layout's.
4. stall: the training loop (the real `Trainer`, with the recipe's `on_step_end`: `poll()` then
   `save()` every K steps) with a synchronous and with an ``async_save`` manager. The stall is the
   time the training thread spends inside checkpoint calls: `save()`, `poll()` and the final
   `wait()` (the async commit itself runs on a background thread).

A profiler wraps (without editing them) the functions the checkpoint code calls, so each timed
span also reports where its time went: get_state_dict, dcp.save / dcp.load and their
write_data / read_data, os.fsync, checksums (every hash update, and file_checksum: read + hash),
collectives, staging, pruning (``bg:`` = on a background thread).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.tensor import DTensor

import titan.checkpoint.manager as manager_mod
import titan.checkpoint.manifest as manifest_mod
import titan.checkpoint.storage as storage_mod
from parallel.mesh import init_process_group, read_env, shutdown
from recipes.cli import compose_config
from titan.build import build_layout, build_parallel_model, resolve_dims
from titan.checkpoint import CheckpointManager
from titan.checkpoint.resume import load_newest_intact
from titan.config import PretrainConfig, register_schemas, validate
from titan.data.loader import load_data, train_loader
from titan.metrics import MetricsLogger, ThroughputMeter
from titan.optim import build_optimizer, build_scheduler
from titan.trainer import Trainer, TrainState

# ----------------------------------------------------------------------------------------------
# profiler: wraps callables by attribute, accumulates seconds per nested label and per thread


class Profiler:
    """Time spent in wrapped functions, keyed by the nesting path ("dcp.save/write_data/fsync").
    Calls on a background thread are keyed with a ``bg:`` prefix."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.local = threading.local()
        self.read_bytes = 0
        self.lock = threading.Lock()

    def reset(self) -> dict[str, float]:
        with self.lock:
            out = dict(self.totals)
            self.totals.clear()
        return out

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        original = getattr(owner, attr)
        prof = self

        def wrapper(*args, **kwargs):
            stack = getattr(prof.local, "stack", None)
            if stack is None:
                stack = prof.local.stack = []
            prefix = "" if threading.current_thread() is threading.main_thread() else "bg:"
            key = prefix + "/".join([*stack, label])
            stack.append(label)
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                stack.pop()
                with prof.lock:
                    prof.totals[key] += dt

        # A staticmethod or function on a class must stay unbound.
        raw = owner.__dict__.get(attr) if isinstance(owner, type) else None
        setattr(owner, attr, staticmethod(wrapper) if isinstance(raw, staticmethod) else wrapper)

    def install(self) -> None:
        self.wrap(manager_mod.CheckpointManager, "save", "save")
        self.wrap(manager_mod.CheckpointManager, "poll", "poll")
        self.wrap(manager_mod.CheckpointManager, "wait", "wait")
        self.wrap(manager_mod.CheckpointManager, "verify", "verify")
        self.wrap(manager_mod.CheckpointManager, "load", "load")
        self.wrap(manager_mod, "get_state_dict", "get_state_dict")
        self.wrap(manager_mod, "set_state_dict", "set_state_dict")
        self.wrap(dcp, "save", "dcp.save")
        self.wrap(dcp, "async_save", "dcp.async_save")
        self.wrap(dcp, "load", "dcp.load")
        self.wrap(_owner_of(FileSystemWriter, "write_data"), "write_data", "write_data")
        self.wrap(_owner_of(FileSystemWriter, "finish"), "finish", "finish(.metadata)")
        self.wrap(storage_mod.InPlaceReader, "read_data", "read_data")
        self.wrap(_owner_of(FileSystemReader, "read_data"), "read_data", "read_data(torch.load)")
        self.wrap(storage_mod, "_pread_into", "pread")
        self.wrap(manager_mod.CheckpointManager, "check_intact", "check_intact")
        self.wrap(manager_mod, "_verify_own_shards", "verify(own shards)")
        self.wrap(manager_mod, "file_record", "file_record")
        self.wrap(manifest_mod, "file_record", "file_record")
        self.wrap(manifest_mod, "file_checksum", "file_checksum(read+hash)")
        manifest_mod.HASHES.update({name: partial(TimedHash, make) for name, make in manifest_mod.HASHES.items()})
        self.wrap(TimedHash, "update", "checksum")
        self.wrap(os, "fsync", "fsync")
        self.wrap(manager_mod, "_all_gather", "collective")
        self.wrap(shutil, "rmtree", "rmtree")
        self.wrap(manager_mod.CheckpointManager, "_commit", "commit")
        self.wrap(manager_mod.CheckpointManager, "_prune", "prune")
        from torch.distributed.checkpoint.staging import DefaultStager
        self.wrap(DefaultStager, "stage", "stage(copy)")
        self._count_read_bytes()

    def _count_read_bytes(self) -> None:
        """Bytes of the stored chunks a load's read requests touch (per request: the whole stored chunk)."""
        owner = storage_mod.InPlaceReader
        inner = owner.read_data
        prof = self

        def read_data(reader, plan, planner):
            n = sum(reader.storage_data[item.storage_index].length for item in plan.items)
            with prof.lock:
                prof.read_bytes += n
            return inner(reader, plan, planner)

        owner.read_data = read_data

    def take_read_bytes(self) -> int:
        with self.lock:
            n, self.read_bytes = self.read_bytes, 0
        return n


class TimedHash:
    """A checksum state whose `update` the profiler can wrap (xxhash's are C types)."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self.inner = make()

    def update(self, data: Any) -> None:
        self.inner.update(data)

    def intdigest(self) -> int:
        return self.inner.intdigest()


def _owner_of(cls: type, attr: str) -> type:
    return next(c for c in cls.__mro__ if attr in c.__dict__)


# ----------------------------------------------------------------------------------------------
# helpers


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def timed(fn: Callable[[], Any]) -> float:
    """Seconds from a barrier before `fn` to a barrier after it on every rank: the slowest rank."""
    barrier()
    t0 = time.perf_counter()
    fn()
    barrier()
    return time.perf_counter() - t0


def drop_caches(rank: int) -> bool:
    """Flush dirty pages and drop the page cache (root only); True when it worked (on every rank)."""
    ok = True
    barrier()
    if rank == 0:
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError:
            ok = False
    flags = gather(ok)
    return all(flags)


def local_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """This rank's shards of everything the checkpoint holds (model and optimizer state)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    out: list[torch.Tensor] = []

    def walk(value: Any) -> None:
        if isinstance(value, DTensor):
            out.append(value.to_local().detach().contiguous())
        elif isinstance(value, torch.Tensor):
            out.append(value.detach().contiguous())
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(model_sd)
    walk(optim_sd)
    return out


def raw_write(path: Path, tensors: list[torch.Tensor], size: int) -> None:
    """Write this rank's tensor bytes, zero-padded to `size`, into one file, then fsync it."""
    written = 0
    with open(path, "wb") as f:
        for t in tensors:
            if t.numel() == 0 or written >= size:
                continue
            view = memoryview(t.view(-1).view(torch.uint8).numpy())
            view = view[:size - written]
            f.write(view)
            written += len(view)
        if written < size:
            f.write(bytes(size - written))
        f.flush()
        os.fsync(f.fileno())


def raw_read(paths: list[Path], buffers: list[bytearray]) -> None:
    """Read whole files into preallocated buffers, unbuffered."""
    for path, buf in zip(paths, buffers):
        view = memoryview(buf)
        with open(path, "rb", buffering=0) as f:
            done = 0
            while done < len(buf):
                n = f.readinto(view[done:])
                if not n:
                    raise EOFError(path)
                done += n


def raw_read_fresh(paths: list[Path]) -> None:
    """Read whole files into newly allocated memory (what a loader that cannot reuse the
    destination pays: the first touch of every page)."""
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            data = f.read()
        del data


def own_files(folder: Path, rank: int) -> list[Path]:
    return sorted(folder.glob(f"__{rank}_*.distcp"))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


class OtherCpu:
    """User-space CPU time that processes other than this job's ranks used, from a start to `stop()`
    (collective): the machine's user time (/proc/stat) minus every rank's own user time (all its
    threads). Kernel time is left out: the writeback of this job's own files runs in kernel threads."""

    def __init__(self) -> None:
        barrier()
        self.t0, self.busy0, self.own0 = time.perf_counter(), machine_busy_s(), own_cpu_s()

    def stop(self) -> float:
        """Average number of cores the other processes kept busy."""
        own = sum(gather(own_cpu_s() - self.own0))
        busy = machine_busy_s() - self.busy0
        return max(0.0, busy - own) / (time.perf_counter() - self.t0)


def machine_busy_s() -> float:
    """Seconds all CPUs spent in user space since boot (user + nice)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:3]]
    except (OSError, ValueError):
        return 0.0
    return sum(fields) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    return os.times().user


def merge_max(profiles: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the largest value over ranks."""
    keys = sorted({k for p in profiles for k in p})
    return {k: max(p.get(k, 0.0) for p in profiles) for k in keys}


def mean_profiles(profiles: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for p in profiles for k in p})
    return {k: sum(p.get(k, 0.0) for p in profiles) / len(profiles) for k in keys}


# ----------------------------------------------------------------------------------------------
# phases


@dataclasses.dataclass
class Ctx:
    cfg: PretrainConfig
    raw_cfg: Any
    env: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any
    trainer: Trainer
    state: TrainState
    prof: Profiler
    out: Path
    work: Path

    def train_state(self, step: int) -> dict[str, Any]:
        """What the recipe's `save` hands the manager besides the tensors."""
        return {"step": step, "tokens": self.state.tokens, "scheduler": self.scheduler.state_dict(),
                "data": self.loader.state_dict(), "wandb_run_id": None,
                "rng": torch.get_rng_state().tolist(), "config": OmegaConf.to_container(self.raw_cfg)}


SAVE_VARIANTS = ("torch-crc-on",)


def phase_save(ctx: Ctx, rounds: int, keep: int, variants: list[str]) -> dict[str, Any]:
    """Manager saves and raw writes, in an order that rotates every round, each after a sync and a
    page-cache drop (when allowed). Both leave the same files behind: each raw write goes to a new
    file and then deletes the ones older than the last `keep`, as the manager prunes (the manager
    does it on a background thread after save() returns; the raw side's deletion time is recorded
    too). `variants` add sides measured in the same rounds: ``torch-crc-on`` saves with the
    framework's writer as if it left torch.save's CRC-32 of each record on (the manifest's checksum,
    taken while writing, covers every byte either way)."""
    rank = ctx.env.rank
    raw_dir = ctx.work / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    raw_files: list[Path] = []
    raw_delete_s: list[float] = []

    def raw_round() -> None:
        raw_files.append(raw_dir / f"rank{rank}-{len(raw_files)}.bin")
        raw_write(raw_files[-1], tensors, own_bytes)
        t0 = time.perf_counter()
        while len(raw_files) > keep:
            raw_files.pop(0).unlink()
        raw_delete_s.append(time.perf_counter() - t0)

    managers = {"save": (CheckpointManager(ctx.work / "save_run", keep=keep, is_writer=ctx.env.is_writer), False)}
    # name -> (manager, whether torch.save's own CRC-32 stays on)
    for name in variants:
        if name not in SAVE_VARIANTS:
            raise SystemExit(f"unknown save variant {name!r}: use {', '.join(SAVE_VARIANTS)}")
        managers[name] = (CheckpointManager(ctx.work / f"save_{name}", keep=keep, is_writer=ctx.env.is_writer), True)
    step = 1_000
    ctx.prof.reset()
    manager = managers["save"][0]
    for m, crc_on in managers.values():  # warm-up, untimed
        with torch_crc_kept(crc_on):
            m.save(step, ctx.model, ctx.optimizer, ctx.train_state(step))
        m.wait()
    ckpt = manager.latest()
    own = own_files(ckpt, rank)
    own_bytes = sum(p.stat().st_size for p in own)
    tensors = local_tensors(ctx.model, ctx.optimizer)
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors)
    raw_round()  # warm-up
    raw_delete_s.clear()
    ctx.prof.reset()

    sides = ["save", "raw", *variants]
    times: dict[str, list[float]] = {name: [] for name in sides}
    profiles: dict[str, list[dict]] = {name: [] for name in managers}
    for r in range(rounds):
        for name in sides[r % len(sides):] + sides[:r % len(sides)]:
            # Same start for every side: nothing dirty left to flush, no page cache to reclaim first.
            drop_caches(rank)
            if name == "raw":
                times[name].append(timed(raw_round))
                continue
            step += 1
            m, crc_on = managers[name]
            ts = ctx.train_state(step)
            ctx.prof.reset()
            with torch_crc_kept(crc_on):
                times[name].append(timed(partial(m.save, step, ctx.model, ctx.optimizer, ts)))
            # Pruning goes on in the background after save() returns (the next save joins it):
            # finish it, untimed, so that it overlaps neither the next side nor the next save.
            m.wait()
            profiles[name].append(ctx.prof.reset())
    all_own = gather(own_bytes)
    all_tensor = gather(tensor_bytes)
    prof = {name: mean_profiles([merge_max(gather(p)) for p in ps]) for name, ps in profiles.items()}
    ckpt = manager.latest()
    delete_s = [max(per_rank) for per_rank in zip(*gather(raw_delete_s))]
    return {"checkpoint": str(ckpt), "distcp_bytes_per_rank": all_own, "tensor_bytes_per_rank": all_tensor,
            "folder_bytes": folder_bytes(ckpt), "save_s": times.pop("save"), "raw_write_s": times.pop("raw"),
            "raw_delete_s": delete_s,
            "save_profile": prof.pop("save"), "keep": keep, "variants_s": times, "variant_profiles": prof}


@contextmanager
def torch_crc_kept(kept: bool):
    """When `kept`, the framework's ShardWriter writes as DCP's FileSystemWriter does, with torch.save's
    CRC-32 of each record on (its own checksums of the files are taken either way)."""
    original = storage_mod.ShardWriter.write_data
    if kept:
        storage_mod.ShardWriter.write_data = FileSystemWriter.write_data
    try:
        yield
    finally:
        storage_mod.ShardWriter.write_data = original


def phase_load(ctx: Ctx, ckpt: Path, rounds: int) -> dict[str, Any]:
    """What a resume runs (`load_newest_intact`: sizes and small files checked, then `CheckpointManager.load`,
    which checksums the shards while DCP reads them) against raw reads, and, for reference, the load
    without its checksum; each side cold (page cache dropped), order rotating."""
    rank = ctx.env.rank
    own = own_files(ckpt, rank)
    buffers = [bytearray(p.stat().st_size) for p in own]

    def resume() -> None:
        load_newest_intact([ckpt], "fail", OmegaConf.to_container(ctx.raw_cfg), ctx.model, ctx.optimizer,
                           lambda *a: None)

    resume()  # warm-up (imports, first-touch of buffers)
    raw_read(own, buffers)
    cold = True
    times: dict[str, list[float]] = {"resume": [], "noverify": [], "raw": [], "fresh": []}
    profiles = []
    sides = list(times)
    for r in range(rounds):
        for what in sides[r % len(sides):] + sides[:r % len(sides)]:
            cold &= drop_caches(rank)
            if what == "resume":
                ctx.prof.reset()
                times[what].append(timed(resume))
                profiles.append(ctx.prof.reset())
            elif what == "noverify":
                times[what].append(timed(partial(CheckpointManager.load, ckpt, ctx.model, ctx.optimizer, verify=False)))
            elif what == "raw":
                times[what].append(timed(partial(raw_read, own, buffers)))
            else:
                times[what].append(timed(partial(raw_read_fresh, own)))
    ctx.prof.reset()
    # Verify alone when the files are cached: the cost of the checksum itself, no disk.
    warm_verify = [timed(partial(CheckpointManager.verify, ckpt)) for _ in range(rounds)]
    prof = mean_profiles([merge_max(gather(p)) for p in profiles])
    return {"resume_s": times["resume"], "load_noverify_s": times["noverify"], "raw_read_s": times["raw"],
            "raw_read_fresh_s": times["fresh"], "cold_cache": cold, "verify_warm_s": warm_verify, "load_profile": prof}


def build_variant(ctx: Ctx, name: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The same model in another layout over the same ranks, built as the recipe builds it."""
    world = ctx.env.world_size
    p = ctx.cfg.parallel
    if name.startswith("tp"):
        tp = int(name[2:] or world)
        par = dataclasses.replace(p, tp=tp, dp_shard=-1, dp_replicate=1)
    elif name.startswith("ddp"):
        par = dataclasses.replace(p, dp_replicate=int(name[3:] or world), dp_shard=1, tp=1)
    elif name.startswith("fsdp"):
        par = dataclasses.replace(p, dp_shard=int(name[4:] or world), dp_replicate=1, tp=1)
    else:
        raise SystemExit(f"unknown layout {name!r}: use tpN, ddpN or fsdpN")
    cfg = dataclasses.replace(ctx.cfg, parallel=par)
    dims = resolve_dims(cfg, ctx.env)
    validate(cfg, world, dims.dp_size)
    layout = build_layout(dims, ctx.env)
    model, _ = build_parallel_model(cfg, layout, ctx.env.device)
    return model, build_optimizer(model, cfg.optim)


def phase_reshape(ctx: Ctx, ckpt: Path, names: list[str], rounds: int, same_name: str) -> dict[str, Any]:
    rank = ctx.env.rank
    targets: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]] = {same_name: (ctx.model, ctx.optimizer)}
    for name in names:
        targets[name] = build_variant(ctx, name)
    for name, (model, optimizer) in targets.items():  # warm-up: optimizer state exists, imports done
        CheckpointManager.load(ckpt, model, optimizer)
    ctx.prof.take_read_bytes()
    times: dict[str, list[float]] = {n: [] for n in targets}
    read_bytes: dict[str, int] = {}
    profiles: dict[str, list[dict]] = {n: [] for n in targets}
    cold = True
    order = list(targets)
    for r in range(rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            model, optimizer = targets[name]
            cold &= drop_caches(rank)
            ctx.prof.reset()
            times[name].append(timed(partial(CheckpointManager.load, ckpt, model, optimizer)))
            profiles[name].append(ctx.prof.reset())
            read_bytes[name] = ctx.prof.take_read_bytes()
    # Correctness: every layout holds the same full weights after loading.
    checks = {}
    ref = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in ctx.model.state_dict().items()}
    for name, (model, _) in targets.items():
        worst = 0.0
        for k, v in model.state_dict().items():
            full = v.full_tensor() if isinstance(v, DTensor) else v
            worst = max(worst, (full - ref[k]).abs().max().item() if full.numel() else 0.0)
        checks[name] = worst
    return {"load_s": times, "cold_cache": cold, "read_bytes_per_rank": {n: gather(b) for n, b in read_bytes.items()},
            "max_abs_diff": checks,
            "profile": {n: mean_profiles([merge_max(gather(p)) for p in ps]) for n, ps in profiles.items()}}


def phase_stall(ctx: Ctx, saves: int, interval: int, keep: int) -> dict[str, Any]:
    """The recipe's loop with a sync and an async manager; per step: train time and checkpoint calls."""
    return {"interval": interval, "saves": saves,
            **{mode: stall_run(ctx, mode == "async", saves, interval, keep) for mode in ("sync", "async")}}


def stall_run(ctx: Ctx, async_save: bool, saves: int, interval: int, keep: int) -> dict[str, Any]:
    """`saves` saves every `interval` steps, then `interval` more steps for the last one to commit,
    then the recipe's final `wait()`."""
    manager = CheckpointManager(ctx.work / f"stall_{'async' if async_save else 'sync'}", keep=keep,
                                is_writer=ctx.env.is_writer, async_save=async_save)
    start = ctx.state.step
    cfg = dataclasses.replace(ctx.cfg, training=dataclasses.replace(ctx.cfg.training,
                                                                    steps=start + interval * (saves + 1)))
    records: list[dict[str, Any]] = []
    last = [0.0]

    def on_step_end(s: TrainState) -> bool:  # the recipe's: poll, then save on the interval
        t0 = time.perf_counter()
        manager.poll()
        t1 = time.perf_counter()
        saved = (s.step - start) % interval == 0 and s.step - start <= interval * saves
        if saved:
            manager.save(s.step, ctx.model, ctx.optimizer, ctx.train_state(s.step))
        t2 = time.perf_counter()
        records.append({"step": s.step - start, "train": t0 - last[0], "poll": t1 - t0, "save": t2 - t1,
                        "saved": saved})
        last[0] = time.perf_counter()
        return False

    trainer = Trainer(cfg, ctx.model, ctx.optimizer, ctx.scheduler, ctx.trainer.batches, lambda: iter(()),
                      ctx.trainer.par, ctx.env.device, MetricsLogger([]), ThroughputMeter(1, ctx.env.world_size, 1.0),
                      ctx.state, on_step_end=on_step_end)
    barrier()
    ctx.prof.reset()
    began = time.perf_counter()
    last[0] = began
    trainer.fit()
    t0 = time.perf_counter()
    manager.wait()
    final_wait = time.perf_counter() - t0
    barrier()
    wall = time.perf_counter() - began
    prof = ctx.prof.reset()
    committed = [p.name for p in manager.committed()]
    all_records = gather(records)
    merged = [{k: (all_records[0][i][k] if k in ("step", "saved") else max(r[i][k] for r in all_records))
               for k in records[i]} for i in range(len(records))]
    manager.close()
    return {"records": merged, "final_wait": max(gather(final_wait)), "wall": wall,
            "profile": merge_max(gather(prof)), "committed": committed}


def measure_step_time(ctx: Ctx, steps: int = 2) -> float:
    times = []
    for _ in range(steps):
        times.append(timed(ctx.trainer.train_step))
        ctx.state.step += 1
    return min(times)


# ----------------------------------------------------------------------------------------------


def build_context(overrides: list[str], work: Path, out: Path) -> tuple[Ctx, Any]:
    """Config, process group, data, model, optimizer, schedule, loader and Trainer, as the recipe
    builds them; the profiler installed; an empty `work` folder."""
    register_schemas()
    raw_cfg = compose_config("pretrain", overrides)
    cfg: PretrainConfig = OmegaConf.to_object(raw_cfg)
    env = read_env()
    dims = resolve_dims(cfg, env)
    validate(cfg, env.world_size, dims.dp_size)
    torch.set_num_threads(cfg.training.num_threads or max(1, (os.cpu_count() or 1) // env.local_world_size))
    init_process_group(env, cfg.parallel.timeout_s)
    if not dist.is_initialized():
        raise SystemExit("run under torchrun with 2 or more ranks")
    data = load_data(cfg.data, cfg.training.seq_len)
    layout = build_layout(dims, env)
    model, par = build_parallel_model(cfg, layout, env.device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.lr, cfg.training.steps)
    loader = train_loader(data, cfg.data, cfg.training, layout.dp_rank, dims.dp_size)
    state = TrainState()
    trainer = Trainer(cfg, model, optimizer, scheduler, iter(loader), lambda: iter(()), par, env.device,
                      MetricsLogger([]), ThroughputMeter(1, env.world_size, 1.0), state)
    prof = Profiler()
    prof.install()
    if env.is_writer:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    barrier()
    return Ctx(cfg, raw_cfg, env, model, optimizer, scheduler, loader, trainer, state, prof, out, work), dims


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json")
    parser.add_argument("--work", type=Path, required=True, help="folder for the checkpoints (same disk as runs)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--saves", type=int, default=2, help="saves per mode in the stall phase")
    parser.add_argument("--interval", type=int, default=0, help="steps between saves in the stall phase (0: auto)")
    parser.add_argument("--reshape", default="tp2", help="comma-separated layouts to load into: tpN, ddpN, fsdpN")
    parser.add_argument("--keep", type=int, default=2, help="CheckpointManager keep (checkpoint.keep's default)")
    parser.add_argument("--save-variants", default="",
                        help=f"comma-separated extra save sides measuring proposed fixes: {', '.join(SAVE_VARIANTS)}")
    parser.add_argument("--phases", default="save,load,reshape,stall",
                        help="comma-separated; save always runs (the others use its checkpoint)")
    args, overrides = parser.parse_known_args()
    args.reshape = [n for n in args.reshape.split(",") if n]
    args.phases = args.phases.split(",")
    args.save_variants = [n for n in args.save_variants.split(",") if n]

    began = time.perf_counter()
    ctx, dims = build_context(overrides, args.work, args.out)
    env, model = ctx.env, ctx.model
    step_s = measure_step_time(ctx)  # also creates AdamW's state
    n_params = sum(p.numel() for p in model.parameters())  # DTensor numel is the global size
    result: dict[str, Any] = {"world_size": env.world_size, "keep": args.keep,
                              "layout": f"fsdp{dims.dp_shard}" if dims.tp == 1 else f"dp{dims.dp_size}xtp{dims.tp}",
                              "params": n_params, "train_step_s": step_s, "setup_s": time.perf_counter() - began}
    log = print if env.is_writer else (lambda *a, **k: None)
    log(f"  setup {result['setup_s']:.0f}s, train step {step_s:.2f}s", flush=True)
    result["other_cpu"] = {}

    def run_phase(name: str, fn: Callable[[], Any]) -> Any:
        """Run a phase; record how many cores other processes on the machine used meanwhile."""
        meter = OtherCpu()
        t0 = time.perf_counter()
        value = fn()
        result["other_cpu"][name] = meter.stop()
        log(f"  {name} phase {time.perf_counter() - t0:.0f}s, other processes used "
            f"{result['other_cpu'][name]:.2f} cores", flush=True)
        return value

    # The other phases use its checkpoint and timings.
    result["save"] = run_phase("save", partial(phase_save, ctx, args.rounds, args.keep, args.save_variants))
    ckpt = Path(result["save"]["checkpoint"])
    if "load" in args.phases:
        result["load"] = run_phase("load", partial(phase_load, ctx, ckpt, args.rounds))
    if "reshape" in args.phases and args.reshape:
        result["reshape"] = run_phase("reshape", partial(phase_reshape, ctx, ckpt, args.reshape, args.rounds,
                                                         result["layout"]))
    if "stall" in args.phases:
        save_s = statistics.median(result["save"]["save_s"])
        # Long enough for a background write to finish before the next save; rank 0's choice for all.
        interval = gather(args.interval or max(3, math.ceil(2.0 * save_s / step_s) + 1))[0]
        result["stall"] = run_phase("stall", partial(phase_stall, ctx, args.saves, interval, args.keep))
    result["total_s"] = time.perf_counter() - began
    if env.is_writer:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=1))
        shutil.rmtree(args.work, ignore_errors=True)
    barrier()
    shutdown()


if __name__ == "__main__":
    main()
