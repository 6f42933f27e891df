"""One rank of `benchmarks.memory`: build the recipe's model and optimizer, train a few steps, and
write what this rank holds and its peak memory to `<out>/rank<r>.json`.

    python -m torch.distributed.run --standalone --nproc-per-node N -m benchmarks.memory_worker \
        --out DIR [recipe overrides ...]

It mirrors `recipes/pretrain.py` (same config, layout, model, initialization, optimizer, schedule,
loader and the real `Trainer`) but logs nothing and saves nothing. Memory is measured two ways:

- ``MemTracker`` (``torch.distributed._tools.mem_tracker``, device-agnostic, so it works on CPU):
  every storage that parameters, gradients, optimizer states and the tensors that ops create
  (activations, FSDP's all-gather and reduce-scatter buffers, optimizer temporaries) hold, at the
  moment their sum peaks. This is the benchmark's "measured" number.
- Peak resident set size: ``VmHWM`` after the steps minus ``VmHWM`` before the model is built (the
  process after imports and process-group setup). Includes allocator slack, gloo buffers and the
  init-time full-size temporaries; a cross-check.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.tensor import DTensor

from benchmarks.worker_setup import setup_worker
from parallel.mesh import shutdown
from titan.build import Layout, build_parallel_model
from titan.config import ModelConfig, PretrainConfig
from titan.data.loader import train_loader
from titan.metrics import MetricsLogger, ThroughputMeter
from titan.models import build_model
from titan.optim import build_optimizer, build_scheduler
from titan.trainer import Trainer, TrainState

# A tiny model whose first dimensions do not split evenly over 2 or 4 ranks (509 vocabulary rows,
# 10-row norms and attention, 5-row MLP), so that the last ranks hold short or empty chunks.
UNEVEN = ModelConfig(name="uneven", dim=10, n_layers=1, n_heads=1, n_kv_heads=1, vocab_size=509,
                     ffn_hidden_dim=5, max_seq_len=16)


def vm_kib(field: str) -> int:
    """A `/proc/self/status` field (VmHWM, VmRSS) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def chunk_rows(d0: int, shards: int, rank: int) -> tuple[int, int]:
    """(rows this rank holds, rows of its padded buffer) for `torch.chunk` of `d0` rows over `shards`:
    chunks of ceil(d0 / shards) rows, the last non-empty one shorter, any after it empty; FSDP2 pads
    every rank's buffer to the full chunk."""
    chunk = math.ceil(d0 / shards)
    return max(0, min(chunk, d0 - rank * chunk)), chunk


def expected_shard_bytes(full_shapes: dict[str, torch.Size], shards: int, rank: int) -> tuple[int, int]:
    """(local bytes, padded bytes) of fp32 parameters on `rank` by the chunk formula."""
    local = padded = 0
    for shape in full_shapes.values():
        d0, rest = shape[0], math.prod(shape[1:])
        rows, chunk = chunk_rows(d0, shards, rank)
        local += rows * rest * 4
        padded += chunk * rest * 4
    return local, padded


def measured_shard_bytes(model: nn.Module) -> tuple[int, int]:
    """(sum of `to_local()` bytes, bytes of the distinct storages behind them) over the parameters."""
    local, storages = 0, {}
    for p in model.parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        local += t.numel() * t.element_size()
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return local, sum(storages.values())


def shard_check(model: nn.Module, full_shapes: dict[str, torch.Size], shards: int, rank: int) -> dict:
    local, storage = measured_shard_bytes(model)
    exp_local, exp_padded = expected_shard_bytes(full_shapes, shards, rank)
    return {"local_bytes": local, "storage_bytes": storage, "expected_local_bytes": exp_local,
            "expected_padded_bytes": exp_padded}


def full_shapes_of(cfg: ModelConfig) -> dict[str, torch.Size]:
    return {name: p.shape for name, p in build_model(cfg).named_parameters()}


def uneven_check(cfg: PretrainConfig, layout: Layout, device: torch.device, shards: int, rank: int) -> dict:
    """The chunk formula on a model with uneven first dimensions, sharded over the same layout."""
    small = dataclasses.replace(cfg, model=UNEVEN)
    model, _ = build_parallel_model(small, layout, device)
    return shard_check(model, full_shapes_of(UNEVEN), shards, rank)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for rank<r>.json")
    args, overrides = parser.parse_known_args()

    cfg, env, dims, data, layout = setup_worker(overrides)
    shards = dims.dp_shard if dims.dp_size > 1 else 1
    shard_rank = layout.mesh["dp_shard"].get_local_rank() if layout.mesh is not None else 0
    uneven = uneven_check(cfg, layout, env.device, shards, shard_rank)

    hwm_before = vm_kib("VmHWM")
    model, par = build_parallel_model(cfg, layout, env.device)
    par = dataclasses.replace(par, comm_counter=None)  # one dispatch mode at a time: the tracker's
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.lr, cfg.training.steps)
    loader = train_loader(data, cfg.data, cfg.training, layout.dp_rank, dims.dp_size)
    shards_info = shard_check(model, full_shapes_of(cfg.model), shards, shard_rank)
    tracker = MemTracker()
    # The tracker refuses a second forward of the root module unless its per-module stats are
    # cleared after each step (the overall peak is kept).
    trainer = Trainer(cfg, model, optimizer, scheduler, iter(loader), lambda: iter(()), par, env.device,
                      MetricsLogger([]), ThroughputMeter(1, env.world_size, 1.0), TrainState(),
                      on_step_end=lambda state: bool(tracker.reset_mod_stats()))  # False: go on
    tracker.track_external(model, optimizer)
    with tracker:
        trainer.fit()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    result = {"rank": env.rank, "world_size": env.world_size, "shards": shards, "shard_rank": shard_rank,
              **shards_info, "uneven": uneven, "tracker_peak": dict(peak),
              "rss_peak_delta_bytes": (vm_kib("VmHWM") - hwm_before) * 1024, "hwm_before_bytes": hwm_before * 1024}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{env.rank}.json").write_text(json.dumps(result, indent=1))
    del trainer, optimizer, model
    if dist.is_initialized():
        shutdown()


if __name__ == "__main__":
    main()
